"""Readers for the weight files of a HF checkpoint directory.

A `WeightSource` reports every tensor's name, shape and dtype from the file headers first (nothing
is loaded), then streams the tensors one file at a time, one tensor at a time.

Supported layouts, in the order they are looked for (the same preference as transformers):
  model.safetensors.index.json (+ the shards its weight_map names)
  model.safetensors
  pytorch_model.bin.index.json (+ shards)        needs torch
  pytorch_model.bin                              needs torch
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from nosa_jax.checkpoint import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_FILE = "pytorch_model.bin"
LOOKED_FOR = (SAFETENSORS_INDEX, SAFETENSORS_FILE, TORCH_INDEX, TORCH_FILE)
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


class ConversionError(CheckpointError):
    """A HF checkpoint cannot be converted; the message names the problem and the fix."""


# safetensors header dtype codes -> numpy dtype names (bfloat16 comes from ml_dtypes)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy-style name ("float32", "bfloat16", ...) or the file's own code if unknown
    file: Path


class WeightSource:
    kind: str = ""

    def __init__(self, directory: Path, files: list[Path], weight_map: dict[str, str] | None):
        self.directory = directory
        self.files = files
        self.weight_map = weight_map
        self._infos: dict[str, TensorInfo] | None = None

    def _read_header(self, file: Path) -> list[TensorInfo]:
        raise NotImplementedError

    def _iter_file(self, file: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def infos(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo of every tensor in the checkpoint, from the headers only."""
        if self._infos is not None:
            return self._infos
        infos: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in self._read_header(file):
                if info.name in infos:
                    raise ConversionError(
                        f"tensor {info.name!r} is stored twice, in {infos[info.name].file.name} and "
                        f"{file.name}; the checkpoint is inconsistent: re-download or re-save it")
                infos[info.name] = info
        if self.weight_map is not None:
            wrong = sorted(n for n, f in self.weight_map.items()
                           if n not in infos or infos[n].file.name != Path(f).name)
            if wrong:
                shown = ", ".join(f"{n} (index says {self.weight_map[n]}, "
                                  f"{'found in ' + infos[n].file.name if n in infos else 'in no shard'})"
                                  for n in wrong[:20])
                more = f" and {len(wrong) - 20} more" if len(wrong) > 20 else ""
                raise ConversionError(
                    f"the index {self.index_name} does not match its shards: {shown}{more}; the "
                    f"shards or the index are corrupt or from different versions: re-download them")
        self._infos = infos
        return infos

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, numpy array) for every tensor, file by file; one tensor in memory at a time."""
        infos = self.infos()
        for file in self.files:
            names = [n for n, i in infos.items() if i.file == file]
            yield from self._iter_file(file, names)

    @property
    def index_name(self) -> str:
        return ""

    def describe(self) -> str:
        if self.weight_map is not None:
            return f"{self.kind} (sharded: {len(self.files)} files, {self.index_name})"
        return f"{self.kind} ({self.files[0].name})"


class SafetensorsSource(WeightSource):
    kind = "safetensors"

    @property
    def index_name(self) -> str:
        return SAFETENSORS_INDEX

    def _open(self, file: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(file), framework="np")
        except Exception as e:  # SafetensorError (not exported as a stable class) or OSError
            raise ConversionError(
                f"{file} is not a readable safetensors file ({e}); it is corrupt or truncated "
                f"(an interrupted download?): re-download it") from e

    def _read_header(self, file: Path) -> list[TensorInfo]:
        f = self._open(file)
        out = []
        for name in f.keys():
            sl = f.get_slice(name)
            code = sl.get_dtype()
            out.append(TensorInfo(name, tuple(int(d) for d in sl.get_shape()),
                                  _ST_DTYPES.get(code, code), file))
        return out

    def _iter_file(self, file, names):
        f = self._open(file)
        for name in names:
            try:
                arr = f.get_tensor(name)
            except Exception as e:
                raise ConversionError(
                    f"cannot read tensor {name!r} from {file} ({e}); the file is corrupt or has an "
                    f"unsupported dtype: re-download it") from e
            yield name, arr


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            "this checkpoint stores its weights as pytorch_model.bin, which needs PyTorch to read: "
            "`pip install torch` (the CPU build is enough), or convert the checkpoint to safetensors "
            "first") from e
    return torch


class TorchBinSource(WeightSource):
    kind = "pytorch_model.bin"

    @property
    def index_name(self) -> str:
        return TORCH_INDEX

    def _load(self, file: Path) -> dict:
        torch = import_torch()
        try:
            try:
                sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(file), map_location="cpu", weights_only=True)  # legacy format
        except Exception as e:
            raise ConversionError(
                f"cannot read {file} with torch.load ({type(e).__name__}: {e}); the file is corrupt, "
                f"truncated or not a plain state dict: re-download it") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ConversionError(f"{file} does not hold a state dict (found {type(sd).__name__}); "
                                  f"save the model with `model.save_pretrained`")
        bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
        if bad:
            raise ConversionError(f"{file}: entries {bad[:10]} are not tensors; this is not a plain "
                                  f"state dict: save the model with `model.save_pretrained`")
        return sd

    def _read_header(self, file):
        sd = self._load(file)
        return [TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), file)
                for k, v in sd.items()]

    def _iter_file(self, file, names):
        torch = import_torch()
        sd = self._load(file)
        for name in names:
            t = sd.pop(name).detach().cpu()
            if t.dtype == torch.bfloat16:
                import ml_dtypes

                arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                arr = t.numpy()
            del t
            yield name, arr
        del sd


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-download it") from e
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise ConversionError(f"{path} has no `weight_map` (tensor name -> shard file); "
                              f"re-download it")
    return wm


def find_weights(directory: Path) -> WeightSource:
    """The weight files of a HF checkpoint directory (see the module doc for the search order)."""
    for index_name, single, cls in ((SAFETENSORS_INDEX, SAFETENSORS_FILE, SafetensorsSource),
                                    (TORCH_INDEX, TORCH_FILE, TorchBinSource)):
        index = directory / index_name
        if index.is_file():
            wm = _read_index(index)
            shards = sorted(set(wm.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ConversionError(
                    f"{index} references shard file(s) {missing} that are missing from {directory}; "
                    f"download the missing shard(s) (or remove the stale index if the weights are "
                    f"in one file)")
            if cls is TorchBinSource:
                import_torch()
            return cls(directory, [directory / s for s in shards], wm)
        if (directory / single).is_file():
            if cls is TorchBinSource:
                import_torch()
            return cls(directory, [directory / single], None)
    others = sorted(p.name for p in directory.iterdir()
                    if p.is_file() and p.name.endswith(_OTHER_WEIGHT_SUFFIXES))
    hint = (f"; found {others}, which is not a layout this converter reads: name a single file "
            f"{SAFETENSORS_FILE} or add a {SAFETENSORS_INDEX} that maps tensor names to the shards"
            if others else "; download the model weights into it")
    raise ConversionError(f"no weight files found in {directory}: looked for "
                          f"{', '.join(LOOKED_FOR)}{hint}")
