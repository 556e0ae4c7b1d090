"""HF / PyTorch NOSA-Llama checkpoint -> nosa-jax parameters.

The target layout is `nosa_jax.model.abstract_params(cfg, dtype)`; every HF name is derived from it:
  embed_tokens.embedding              <- model.embed_tokens.weight
  norm.weight                         <- model.norm.weight
  lm_head.kernel          [H, V]      <- lm_head.weight [V, H] (transposed)
  layers.<module>.kernel  [L, in, out] <- model.layers.{i}.<module>.weight [out, in] (transposed,
                                          stacked over i)
  layers.<module>.{bias,weight,A}     <- model.layers.{i}.<module>.{bias,weight,A} (stacked)
  layers.self_attn.qkv_proj.{kernel,bias} <- model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias},
  layers.mlp.gate_up_proj.{kernel,bias}   <- model.layers.{i}.mlp.{gate,up}_proj.{weight,bias},
                                          each into its column range (`model.FUSED_PARAMS`)
so o, delta, down, the norms and A (and the biases the config asks for) follow the model without a
hand-written table; the fused parameters (`model.FUSED_PARAMS`) are the one special case (`_hf_parts`).
`load_hf_checkpoint` is the one implementation used both by `convert_checkpoint` (which writes a
converted directory) and by `nosa_jax.checkpoint.load_params` (which loads a HF directory in memory).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from nosa_jax.checkpoint import (CheckpointError, TOKENIZER_FILES, flatten_params, resolve_dtype,
                                 save_params, unflatten_params)
from nosa_jax.config import ConfigError, ModelConfig

from .sources import ConversionError, WeightSource, find_weights

__all__ = ["ConversionError", "HFCheckpoint", "Slot", "convert_checkpoint", "hf_layout",
           "load_hf_checkpoint", "read_hf_config", "to_hf_state_dict"]

# Non-persistent buffers that some exporters still write; they carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
NOSA_MODULES = (("self_attn", "A"), ("self_attn", "delta"))
_FLOAT_SOURCES = ("float64", "float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: `params[path][index]`, transposed or not. `index` picks the layer
    (None: not stacked) and, for a fused parameter, the column range [start, stop) of its last axis
    (None: all of it)."""

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    transpose: bool
    hf_shape: tuple[int, ...]
    cols: tuple[int, int] | None = None

    @property
    def index(self) -> tuple:
        layer = () if self.layer is None else (self.layer,)
        return layer + ((..., slice(*self.cols)) if self.cols is not None else ())

    @property
    def is_nosa(self) -> bool:
        return _is_nosa_path(self.path)


_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias", "A": "A"}


def _hf_parts(cfg: ModelConfig, mods: list[str]) -> list[tuple[list[str], tuple[int, int] | None]]:
    """The HF name part(s) that fill a model parameter (`mods`: its path with the HF leaf name),
    each with its column range (None: all of it). Only the fused parameters have several."""
    from nosa_jax.model import FUSED_PARAMS

    if tuple(mods[-3:-1]) not in FUSED_PARAMS:
        return [(mods, None)]
    names, widths = FUSED_PARAMS[tuple(mods[-3:-1])]
    edges = np.cumsum((0,) + widths(cfg)).tolist()
    return [(mods[:-2] + [hf, mods[-1]], (a, b)) for hf, a, b in zip(names, edges[:-1], edges[1:])]


def hf_layout(cfg: ModelConfig, dtype=jnp.float32) -> tuple[dict[tuple, Any], dict[str, Slot]]:
    """(flat abstract params {path: ShapeDtypeStruct}, {HF name: Slot}) for a config."""
    from nosa_jax.model import abstract_params

    flat = flatten_params(abstract_params(cfg, dtype))
    slots: dict[str, Slot] = {}
    for path, sds in flat.items():
        leaf = path[-1]
        if leaf not in _LEAF_TO_HF:
            raise ConversionError(f"internal: the converter does not know how to fill model parameter "
                                  f"{'.'.join(path)}; update convert/hf.py for the new model layout")
        transpose = leaf == "kernel"
        stacked = path[0] == "layers"
        shape = tuple(sds.shape[1:] if stacked else sds.shape)
        for mods, cols in _hf_parts(cfg, list(path[:-1]) + [_LEAF_TO_HF[leaf]]):
            part = shape if cols is None else shape[:-1] + (cols[1] - cols[0],)
            hf_shape = part[::-1] if transpose else part
            if stacked:
                for i in range(cfg.num_hidden_layers):
                    name = f"model.layers.{i}." + ".".join(mods[1:])
                    slots[name] = Slot(name, path, i, transpose, hf_shape, cols)
            else:
                name = ".".join(mods) if path[0] == "lm_head" else "model." + ".".join(mods)
                slots[name] = Slot(name, path, None, transpose, hf_shape, cols)
    return flat, slots


def to_hf_state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The inverse map: Flax parameters -> {upstream HF name: float32 array} (for exporting)."""
    _, slots = hf_layout(cfg)
    flat = flatten_params(params)
    out = {}
    for name, slot in slots.items():
        a = np.asarray(flat[slot.path], np.float32)[slot.index]
        out[name] = np.ascontiguousarray(a.T if slot.transpose else a)
    return out


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def summarize_names(names) -> str:
    """All names, with per-layer names grouped: model.layers.{0-3,5}.self_attn.A."""
    groups: dict[str, list[int]] = {}
    singles = []
    for n in names:
        m = re.match(r"^(.*?\.layers\.)(\d+)(\..*)$", n)
        if m:
            groups.setdefault(m.group(1) + "{}" + m.group(3), []).append(int(m.group(2)))
        else:
            singles.append(n)
    parts = []
    for pattern, idx in groups.items():
        idx = sorted(set(idx))
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append(str(start) if start == a else f"{start}-{a}")
                start = b
        parts.append(pattern.replace("{}", str(idx[0]) if len(idx) == 1 else "{" + ",".join(runs) + "}"))
    return ", ".join(sorted(singles + parts, key=_natural))


def read_hf_config(hf_dir: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the raw config.json dict) of a HF checkpoint directory."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; a HF checkpoint directory needs the "
                              f"model's config.json next to its weights: download it too")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); fix or re-download it") from e
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    try:
        cfg = ModelConfig.from_json(path)
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from e
    return cfg, raw


@dataclasses.dataclass
class HFCheckpoint:
    """A HF checkpoint converted in memory: params are numpy arrays in the abstract_params layout."""

    cfg: ModelConfig
    config_dict: dict
    params: dict
    dtype: np.dtype
    source: WeightSource
    source_dtype: str
    nosa_weights: str  # "present" | "missing"
    notices: list[str]  # things the user must be told (printed)
    notes: list[str]  # everything recorded in the metadata (notices included)
    ignored: list[str]

    def metadata(self) -> dict:
        return {
            "source": str(self.source.directory.resolve()),
            "source_format": self.source.describe(),
            "source_files": [f.name for f in self.source.files],
            "source_dtype": self.source_dtype,
            "nosa_weights": self.nosa_weights,
            "ignored_tensors": self.ignored,
            "notes": self.notes,
        }


def _choose_dtype(infos, slots, requested, notes) -> tuple[np.dtype, str]:
    counts: dict[str, int] = {}
    for name, slot in slots.items():
        if name in infos:
            info = infos[name]
            counts[info.dtype] = counts.get(info.dtype, 0) + int(np.prod(info.shape, dtype=np.int64))
    source = max(counts, key=counts.get) if counts else "float32"
    if len(counts) > 1:
        notes.append(f"the checkpoint mixes dtypes {dict(sorted(counts.items()))} (elements); "
                     f"the most common is {source}")
    if requested is not None:
        return requested, source
    if source == "float64":
        notes.append("float64 checkpoint stored as float32 (pass dtype to choose another)")
        return np.dtype("float32"), source
    return jnp.dtype(source), source


def load_hf_checkpoint(hf_dir: str | Path, *, dtype=None, progress: bool = False) -> HFCheckpoint:
    """Read, validate and convert a HF checkpoint directory in memory (numpy arrays).

    Every check runs on the file headers before any tensor is read: missing/unexpected names,
    shapes (against `abstract_params`), dtypes. Tensors are then streamed one at a time into the
    stacked output arrays (one copy of the model in memory).
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise ConversionError(f"checkpoint directory {hf_dir} does not exist; check the path "
                              f"(it must hold config.json and the weight files)")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory; pass the checkpoint directory that "
                              f"holds config.json and the weight files")
    try:
        target = resolve_dtype(dtype)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    cfg, raw = read_hf_config(hf_dir)
    source = find_weights(hf_dir)
    infos = source.infos()
    notes: list[str] = []
    notices: list[str] = []

    flat, slots = hf_layout(cfg)  # shapes; the output dtype is chosen below
    ignored = sorted((n for n in infos if n.endswith(IGNORED_SUFFIXES)), key=_natural)
    ignored_set = set(ignored)
    present = set(infos) - ignored_set
    expected = set(slots)

    # --- names ---------------------------------------------------------------------------------
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in present
    unexpected = sorted(present - expected - ({"lm_head.weight"} if tied_head else set()), key=_natural)
    missing = expected - present
    nosa_names = {n for n, s in slots.items() if s.is_nosa}
    nosa_missing = False
    if nosa_names and nosa_names <= missing:
        nosa_missing = True
        missing -= nosa_names
    elif nosa_names & missing:
        have = sorted(nosa_names - missing, key=_natural)
        lack = sorted(nosa_names & missing, key=_natural)
        raise ConversionError(
            f"the NOSA eviction weights are only partly present: missing {summarize_names(lack)} "
            f"(present: {summarize_names(have)}); a NOSA checkpoint needs self_attn.A and "
            f"self_attn.delta in every layer (a plain Llama checkpoint has none, and is converted "
            f"with A=0, delta=0): the checkpoint is incomplete, re-download or re-save it")
    if "lm_head.weight" in missing:
        raise ConversionError(
            f"lm_head.weight is missing but config.json has tie_word_embeddings: false; if the model "
            f"reuses the input embedding as its output head, set \"tie_word_embeddings\": true in "
            f"{hf_dir / 'config.json'}, otherwise the checkpoint is incomplete: re-download it")
    problems = []
    if missing:
        problems.append(
            f"missing tensor(s) {summarize_names(sorted(missing, key=_natural))} (the config asks "
            f"for them: check num_hidden_layers, attention_bias and mlp_bias in config.json, or "
            f"re-download an incomplete checkpoint)")
    if unexpected:
        problems.append(
            f"unexpected tensor(s) {summarize_names(unexpected)} (the nosa-jax Llama/NOSA model has "
            f"no such parameters{_unexpected_hint(cfg, unexpected)}; a checkpoint of another "
            f"architecture cannot be converted)")
    if problems:
        raise ConversionError(f"{source.describe()} in {hf_dir} does not match config.json: "
                              + "; ".join(problems))

    # --- shapes and dtypes -----------------------------------------------------------------------
    mism = [f"{n}: expected {list(slots[n].hf_shape)}, found {list(infos[n].shape)}"
            for n in sorted(present & expected, key=_natural) if infos[n].shape != slots[n].hf_shape]
    if tied_head and infos["lm_head.weight"].shape != slots["model.embed_tokens.weight"].hf_shape:
        mism.append(f"lm_head.weight: expected {list(slots['model.embed_tokens.weight'].hf_shape)} "
                    f"(tied to the embedding), found {list(infos['lm_head.weight'].shape)}")
    if mism:
        raise ConversionError(
            f"tensor shape(s) do not match config.json ({cfg.num_hidden_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_attention_heads} query / {cfg.num_key_value_heads} kv "
            f"heads of {cfg.head_dim}, intermediate {cfg.intermediate_size}, vocab "
            f"{cfg.vocab_size}): {'; '.join(mism)}; the config.json belongs to another model: "
            f"use the config that came with these weights")
    used = sorted(present, key=_natural)
    bad = [f"{n} ({infos[n].dtype})" for n in used if infos[n].dtype not in _FLOAT_SOURCES]
    if bad:
        raise ConversionError(
            f"tensor(s) with unsupported dtype: {', '.join(bad[:20])}"
            f"{' ...' if len(bad) > 20 else ''}; only float64/float32/float16/bfloat16 weights are "
            f"supported (quantized checkpoints are not): use an unquantized checkpoint")

    out_dtype, source_dtype = _choose_dtype(infos, slots, target, notes)
    if nosa_missing:
        msg = ("NOSA weights missing (no self_attn.A / self_attn.delta in the checkpoint: a plain "
               "Llama checkpoint): converted with A=0, delta=0, so the eviction score cis is 0 "
               "everywhere; `full` and `infllmv2` modes are unaffected, `nosa` mode then ranks "
               "blocks without the eviction score")
        notices.append(msg)
        notes.append(msg)
    if ignored:
        notes.append(f"ignored non-persistent buffers: {summarize_names(ignored)}")

    # --- stream ----------------------------------------------------------------------------------
    bufs = {p: (np.zeros if nosa_missing and _is_nosa_path(p) else np.empty)(s.shape, out_dtype)
            for p, s in flat.items()}
    tie_stash: dict[str, np.ndarray] = {}
    filled = 0
    from tqdm.auto import tqdm

    with tqdm(total=len(infos), desc=f"reading {hf_dir.name}", unit="tensor",
              disable=not progress, file=sys.stderr) as bar:
        for name, arr in source.iter_tensors():
            bar.update(1)
            if name in ignored_set:
                continue
            if tuple(arr.shape) != infos[name].shape:  # header and data disagree: corrupt file
                raise ConversionError(f"{name} in {infos[name].file}: the header says "
                                      f"{list(infos[name].shape)} but the data has "
                                      f"{list(arr.shape)}; the file is corrupt: re-download it")
            if tied_head and name in ("lm_head.weight", "model.embed_tokens.weight"):
                other = "model.embed_tokens.weight" if name == "lm_head.weight" else "lm_head.weight"
                if other in tie_stash:
                    _check_tied(tie_stash.pop(other), arr, hf_dir, notes)
                else:
                    tie_stash[name] = arr
                if name == "lm_head.weight":
                    continue
            slot = slots[name]
            src = arr.T if slot.transpose else arr
            dst = bufs[slot.path][slot.index]  # a view: writes land in the stacked buffer
            with np.errstate(over="ignore", invalid="ignore"):
                dst[...] = src
            if out_dtype == np.float16 and arr.dtype != np.float16:
                if np.isinf(dst).any() and not np.isinf(arr.astype(np.float32)).any():
                    raise ConversionError(
                        f"{name} overflows float16 (values beyond +-65504); convert to bfloat16 or "
                        f"float32 instead")
            filled += 1
            del arr, src
    if filled != len(expected - (nosa_names if nosa_missing else set())):  # headers said otherwise
        raise ConversionError(f"internal: {filled} of {len(expected)} tensors were read from "
                              f"{hf_dir}; a weight file changed during the conversion? re-run it")
    params = unflatten_params(bufs)
    return HFCheckpoint(cfg=cfg, config_dict=raw, params=params, dtype=np.dtype(out_dtype),
                        source=source, source_dtype=source_dtype,
                        nosa_weights="missing" if nosa_missing else "present",
                        notices=notices, notes=notes, ignored=ignored)


def _unexpected_hint(cfg: ModelConfig, names: list[str]) -> str:
    hints = []
    attn_bias = [n for n in names if re.search(r"self_attn\.(q_proj|k_proj|v_proj|o_proj|delta)\.bias$", n)]
    if attn_bias and not cfg.attention_bias:
        hints.append("the checkpoint has attention biases: set \"attention_bias\": true in config.json")
    if any(re.search(r"mlp\.\w+\.bias$", n) for n in names) and not cfg.mlp_bias:
        hints.append("the checkpoint has MLP biases: set \"mlp_bias\": true in config.json")
    if not hints:
        hints.append("check num_hidden_layers, attention_bias, mlp_bias and tie_word_embeddings in "
                     "config.json")
    return ": " + "; ".join(hints)


def _is_nosa_path(path: tuple) -> bool:
    """True for the NOSA eviction parameters (layers.self_attn.A, layers.self_attn.delta.*)."""
    return path[0] == "layers" and any(tuple(path[1:1 + len(m)]) == m for m in NOSA_MODULES)


def _check_tied(a: np.ndarray, b: np.ndarray, hf_dir: Path, notes: list[str]) -> None:
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.array_equal(a32, b32):
        diff = float(np.max(np.abs(a32 - b32)))
        raise ConversionError(
            f"config.json has tie_word_embeddings: true but the checkpoint's lm_head.weight differs "
            f"from model.embed_tokens.weight (max |diff| {diff:.3g}); the model has its own output "
            f"head: set \"tie_word_embeddings\": false in {hf_dir / 'config.json'}")
    notes.append("lm_head.weight equals model.embed_tokens.weight (tied embeddings): not stored")


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, dtype=None,
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a HF checkpoint directory into a nosa-jax directory; returns the output path.

    `dtype`: None keeps the checkpoint's floating dtype; else "float32" | "bfloat16" | "float16".
    The output (config.json, params/, nosa_jax.json, tokenizer files) appears atomically: nothing is
    left behind on failure, and an existing `out_dir` is replaced only with `overwrite=True` and
    only once the new one is complete.
    """
    hf_dir = Path(hf_dir)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"output directory {out} already exists; pass overwrite=True "
                              f"(--overwrite) to replace it or choose another output path")
    if hf_dir.exists():
        src = hf_dir.resolve()
        dst = out.resolve()
        if src == dst or dst in src.parents:
            raise ConversionError(f"the output directory {out} is (or contains) the input {hf_dir}; "
                                  f"choose an output path outside the checkpoint directory")
    loaded = load_hf_checkpoint(hf_dir, dtype=dtype, progress=progress)
    for note in loaded.notices:
        print(f"notice: {note}", file=sys.stderr)
    tok = [hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="orbax.*")
            return save_params(out, loaded.cfg, loaded.params, config_dict=loaded.config_dict,
                               metadata=loaded.metadata(), copy_files=tok, overwrite=overwrite)
    except ConversionError:
        raise
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    except OSError as e:
        raise ConversionError(f"writing {out} failed ({e}); check the free disk space and the "
                              f"permissions of {out.parent}") from e
