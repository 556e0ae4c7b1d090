"""Load model parameters from a converted nosa-jax directory or straight from a HF checkpoint.

A converted directory (written by `convert.convert_checkpoint` through `save_params`) holds:
  config.json      the source HF config, with the resolved `nosa` section
  params/          orbax `StandardCheckpointer` checkpoint of the nested parameter dict, in the
                   layout of `nosa_jax.model.abstract_params`
  nosa_jax.json    metadata: format version, dtype, source, conversion notes
  tokenizer files  copied from the source when present

`load_params` also accepts a HF checkpoint directory (config.json + safetensors / pytorch .bin); it
is converted in memory with the converter's own name mapping and validation, nothing is written.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, ModelConfig

FORMAT_NAME = "nosa-jax-params"
# 2: q/k/v fused into layers.self_attn.qkv_proj; 3: gate/up fused into layers.mlp.gate_up_proj
# (older versions are fused on load, `_fuse_params`)
FORMAT_VERSION = 3
METADATA_FILE = "nosa_jax.json"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "f16": "float16", "half": "float16"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


def resolve_dtype(dtype) -> np.dtype | None:
    """None -> None; "float32" | "bfloat16" | "float16" (or a numpy/jax dtype of those) -> dtype."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else None
    if name is None:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    name = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}: use one of {SUPPORTED_DTYPES} "
                              f"(or None to keep the checkpoint's dtype)")
    return jnp.dtype(name)


def is_converted_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `nosa_jax.json` of a converted directory."""
    f = Path(path) / METADATA_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f} not found: {path} is not a converted nosa-jax checkpoint; "
                              f"convert it with `nosa-jax convert`") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); re-run the conversion") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{f} is not nosa-jax metadata (format != {FORMAT_NAME!r}); "
                              f"re-run the conversion")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: format_version {version!r} is not supported by this nosa-jax (reads <= "
            f"{FORMAT_VERSION}); upgrade nosa-jax or re-convert the checkpoint with this version")
    return meta


def tokenizer_path(path: str | Path) -> Path | None:
    """The `tokenizer.json` in a checkpoint directory (converted or HF), if there is one."""
    p = Path(path) / "tokenizer.json"
    return p if p.is_file() else None


def flatten_params(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested parameter dict -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def check_layout(cfg: ModelConfig, params: dict, what: str = "parameters") -> None:
    """Raise CheckpointError unless `params` has exactly the names and shapes of abstract_params."""
    from .model import abstract_params

    want = {k: tuple(v.shape) for k, v in flatten_params(abstract_params(cfg)).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
    problems = []
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing:
        problems.append(f"missing {[_dotted(k) for k in missing]}")
    if extra:
        problems.append(f"unexpected {[_dotted(k) for k in extra]}")
    for k in sorted(set(want) & set(got)):
        if want[k] != got[k]:
            problems.append(f"{_dotted(k)}: expected shape {list(want[k])}, found {list(got[k])}")
    if problems:
        raise CheckpointError(f"{what} do not match the config's layout: " + "; ".join(problems))


def save_params(out_dir: str | Path, cfg: ModelConfig, params: dict, *,
                config_dict: dict | None = None, metadata: dict | None = None,
                copy_files: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Write a converted directory atomically and return its path.

    Everything goes to a temporary directory next to `out_dir` that is renamed into place at the end;
    on any failure the temporary directory is removed. An existing `out_dir` is an error unless
    `overwrite`, in which case it is replaced only once the new one is complete.
    `config_dict`: the config.json to write (default `cfg.to_hf_dict()`); its `nosa` section is set
    to the resolved NOSA settings. `metadata`: extra keys for nosa_jax.json. `copy_files`: files
    (e.g. tokenizer files) copied next to the parameters.
    """
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output directory {out_dir} already exists; pass overwrite=True "
                              f"(--overwrite) to replace it or choose another output path")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} exists and is not a directory; remove it or "
                              f"choose another output path")
    check_layout(cfg, params)
    leaves = list(flatten_params(params).values())
    dtypes = sorted({jnp.dtype(a.dtype).name for a in leaves})
    if len(dtypes) != 1:
        raise CheckpointError(f"parameters must share one dtype, found {dtypes}")

    d = dict(config_dict) if config_dict is not None else cfg.to_hf_dict()
    d["nosa"] = cfg.nosa.to_dict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown-field warnings were shown when it was read
            same = ModelConfig.from_hf_dict(d, longrope_switch=cfg.longrope_switch) == cfg
    except ConfigError as e:
        raise CheckpointError(f"config_dict is not a valid config: {e}") from e
    if not same:
        raise CheckpointError("config_dict does not describe the given config")

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": dtypes[0],
        "num_parameters": int(sum(int(np.prod(np.shape(a))) for a in leaves)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(metadata or {})
    meta["format"], meta["format_version"], meta["dtype"] = FORMAT_NAME, FORMAT_VERSION, dtypes[0]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        copied = []
        for f in copy_files:
            f = Path(f)
            shutil.copy2(f, tmp / f.name)
            copied.append(f.name)
        if copied:
            meta.setdefault("copied_files", copied)
        (tmp / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        # metadata last: a directory with nosa_jax.json is a complete one
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise CheckpointError(f"output directory {out_dir} appeared during the conversion; "
                              f"pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _to_device(flat: dict[tuple, Any]) -> dict:
    """Numpy leaves -> jax arrays one at a time, releasing each numpy array as it goes."""
    out = {}
    device = jax.devices()[0]  # committed there, as the orbax restore of a converted dir is
    for k in list(flat):
        out[k] = jax.device_put(flat.pop(k), device)
    return unflatten_params(out)


def unflatten_params(flat: dict[tuple, Any]) -> dict:
    """{path tuple: leaf} -> nested parameter dict (the inverse of flatten_params)."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = v
    return tree


def _fuse_params(tree: dict) -> dict:
    """A parameter tree saved by an older format version, with separate projections where the model
    now has a fused parameter (`model.FUSED_PARAMS`: format 1 had layers.self_attn.{q,k,v}_proj,
    formats 1 and 2 layers.mlp.{gate,up}_proj), in the current layout: their kernels (and biases)
    joined along the last axis in the fused parameter's column order. Other trees are returned
    unchanged. Works on arrays and under jax.eval_shape."""
    from .model import FUSED_PARAMS

    layers = tree.get("layers", {})
    for (module, fused_name), (names, _) in FUSED_PARAMS.items():
        mod = layers.get(module, {})
        if not all(n in mod for n in names):
            continue
        fused = {leaf: jnp.concatenate([mod[n][leaf] for n in names], axis=-1) for leaf in mod[names[0]]}
        layers = {**layers, module: {k: v for k, v in mod.items() if k not in names} | {fused_name: fused}}
    return {**tree, "layers": layers} if "layers" in tree else tree


def _load_converted(path: Path, dtype) -> tuple[ModelConfig, dict]:
    import orbax.checkpoint as ocp
    from .model import abstract_params

    path = path.absolute()  # orbax resolves relative paths wrongly
    meta = read_metadata(path)
    if meta.get("nosa_weights") == "missing":
        print(f"notice: {path} was converted from a checkpoint without NOSA weights (A=0, delta=0): "
              f"the eviction score cis is 0 everywhere", file=sys.stderr)
    try:
        cfg = ModelConfig.from_json(path / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    dtype = dtype or resolve_dtype(meta.get("dtype"))
    target = flatten_params(abstract_params(cfg, dtype))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.metadata(path / PARAMS_DIR).item_metadata.tree
        except Exception as e:  # orbax raises several types for a damaged directory
            raise CheckpointError(f"cannot read the orbax checkpoint {path / PARAMS_DIR} ({e}); the "
                                  f"directory is incomplete or damaged: re-run the conversion") from e
        # restored as stored (orbax matches the tree exactly), then brought to the current layout
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, dtype, sharding=sharding), dict(tree))
        found = {k: tuple(v.shape) for k, v in flatten_params(jax.eval_shape(_fuse_params, saved)).items()}
        want = {k: tuple(v.shape) for k, v in target.items()}
        if found != want:
            problems = [f"missing {_dotted(k)}" for k in sorted(set(want) - set(found))]
            problems += [f"unexpected {_dotted(k)}" for k in sorted(set(found) - set(want))]
            problems += [f"{_dotted(k)}: config expects {list(want[k])}, stored {list(found[k])}"
                         for k in sorted(set(want) & set(found)) if want[k] != found[k]]
            raise CheckpointError(f"{path / PARAMS_DIR} does not match {path / CONFIG_FILE}: "
                                  + "; ".join(problems) + "; re-run the conversion")
        try:
            params = ckptr.restore(path / PARAMS_DIR, saved)
        except Exception as e:
            raise CheckpointError(f"cannot restore {path / PARAMS_DIR} ({type(e).__name__}: {e}); "
                                  f"the checkpoint is damaged: re-run the conversion") from e
    return cfg, _fuse_params(params)


def load_config(path: str | Path) -> ModelConfig:
    """The model config of a converted or HF checkpoint directory (no weights read)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} not found; point to a converted nosa-jax or HF checkpoint directory")
    try:
        return ModelConfig.from_json(f)
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from e


def load_params(path: str | Path, *, dtype=None, progress: bool = False) -> tuple[ModelConfig, dict]:
    """(config, nested dict of jax arrays in the `abstract_params` layout) from a checkpoint dir.

    `path`: a converted nosa-jax directory (nosa_jax.json + params/) or a HF directory
    (config.json + model.safetensors / sharded safetensors / pytorch_model.bin). `dtype`: None keeps
    the stored dtype; else "float32" | "bfloat16" | "float16".
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (or is not a directory); "
                              f"pass a converted nosa-jax directory or a HF checkpoint directory")
    if (path / METADATA_FILE).is_file():
        if not (path / PARAMS_DIR).is_dir():
            raise CheckpointError(f"{path} has {METADATA_FILE} but no {PARAMS_DIR}/ directory: the "
                                  f"conversion is incomplete; re-run it")
        return _load_converted(path, dtype)
    if (path / CONFIG_FILE).is_file():
        from convert.hf import load_hf_checkpoint

        loaded = load_hf_checkpoint(path, dtype=dtype, progress=progress)
        for note in loaded.notices:
            print(f"notice: {note}", file=sys.stderr)
        flat = flatten_params(loaded.params)
        loaded.params = None  # the flat dict now holds the only references
        return loaded.cfg, _to_device(flat)
    raise CheckpointError(
        f"{path} is neither a converted nosa-jax checkpoint (no {METADATA_FILE}) nor a HF checkpoint "
        f"(no {CONFIG_FILE}); point to the directory that holds them")


def load_model(path: str | Path, *, mode: str = "nosa", dtype=None, q_chunk: int | None = None,
               impl: str = "auto", progress: bool = False):
    """A `NosaForCausalLM` with the weights of a converted or HF checkpoint directory.
    `impl`: "auto" (Pallas kernels on a GPU, plain jnp elsewhere), "reference" or "pallas"."""
    from .model import from_params

    cfg, params = load_params(path, dtype=dtype, progress=progress)
    return from_params(cfg, params, mode=mode, dtype=resolve_dtype(dtype), q_chunk=q_chunk, impl=impl)
