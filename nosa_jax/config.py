"""Model and NOSA configuration read from a Hugging Face `config.json`.

`ModelConfig` holds the Llama backbone fields that change the math; `NosaConfig` holds the NOSA
hyperparameters. Upstream hard-codes the NOSA values (spec 2.1); here they default to those values
and may be overridden by an optional `nosa` section of `config.json` or by keyword arguments.
Everything is validated on construction, and unknown or unsupported values raise `ConfigError`
with the field name and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

ATTENTION_MODES = ("full", "infllmv2", "nosa")
# Model shapes of the NOSA family for random-weight benchmarks and GPU tests (ModelConfig keyword
# arguments): the NOSA-8B / MiniCPM4-8B shape and a 1B shape.
SHAPES = {
    "8b": dict(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072),
    "1b": dict(vocab_size=73448, hidden_size=1536, intermediate_size=4096, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072),
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class ConfigError(ValueError):
    """A config field is missing, unknown or has an unsupported value."""


@dataclasses.dataclass(frozen=True)
class NosaConfig:
    """NOSA hyperparameters (upstream defaults, spec 2.1).

    kernel_size/kernel_stride: compression window length/stride in tokens.
    block_size: selection and attention block in tokens.
    init_blocks: leading "sink" blocks always selected.
    local_blocks: blocks before the current one always selected (the current block is added).
    topk: blocks selected per (query, kv head).
    qk_select: query-aware picks, forced blocks included (upstream: 1 + 16 + 16 = 33).
    """

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    local_blocks: int = 16
    topk: int = 64
    qk_select: int = 33

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"nosa.{f.name} must be an integer, got {v!r}")
        for name in ("kernel_size", "kernel_stride", "block_size", "topk", "qk_select"):
            if getattr(self, name) < 1:
                raise ConfigError(f"nosa.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("init_blocks", "local_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"nosa.{name} must be >= 0, got {getattr(self, name)}")
        if self.kernel_size % self.kernel_stride:
            raise ConfigError(
                f"nosa.kernel_size ({self.kernel_size}) must be a multiple of nosa.kernel_stride "
                f"({self.kernel_stride})")
        if self.block_size % self.kernel_stride:
            raise ConfigError(
                f"nosa.block_size ({self.block_size}) must be a multiple of nosa.kernel_stride "
                f"({self.kernel_stride}): block pooling steps over whole strides")
        if self.qk_select > self.topk:
            raise ConfigError(f"nosa.qk_select ({self.qk_select}) must be <= nosa.topk ({self.topk})")
        if self.forced_blocks > self.qk_select:
            raise ConfigError(
                f"nosa: the forced blocks (init_blocks + local_blocks + 1 = {self.forced_blocks}) "
                f"must fit in qk_select ({self.qk_select}); raise qk_select or lower local_blocks")

    @property
    def forced_blocks(self) -> int:
        """Sink blocks + local blocks + the current block."""
        return self.init_blocks + self.local_blocks + 1

    @property
    def pool_stride(self) -> int:
        """Compressed windows per block step (upstream 64 / 16 = 4)."""
        return self.block_size // self.kernel_stride

    def num_windows(self, n_tokens: int) -> int:
        """Complete compression windows over `n_tokens` tokens (spec 2.3)."""
        if n_tokens < self.kernel_size:
            return 0
        return (n_tokens - self.kernel_size) // self.kernel_stride + 1

    def num_blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # Informational keys that upstream fixtures record in their `nosa` section, with the only
    # value each may take (anything else would describe a model this code does not implement).
    _DERIVED = ("window_size", "select_blocks", "use_nope", "dense_len", "attn_implementation", "note")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, **overrides) -> "NosaConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - set(cls._DERIVED))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in the `nosa` config section: {unknown}; "
                f"allowed: {sorted(known) + sorted(cls._DERIVED)}")
        bad_override = sorted(set(overrides) - known)
        if bad_override:
            raise ConfigError(f"unknown NOSA override(s) {bad_override}; allowed: {sorted(known)}")
        values = {k: d[k] for k in known if k in d}
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        checks = {
            "window_size": cfg.local_blocks * cfg.block_size,
            "select_blocks": cfg.qk_select - cfg.init_blocks - cfg.local_blocks,
            "use_nope": False,
            "dense_len": 0,
        }
        for key, expected in checks.items():
            if key in d and d[key] != expected:
                raise ConfigError(
                    f"nosa.{key} = {d[key]!r} is not supported: with the other NOSA settings it must "
                    f"be {expected!r}")
        if "attn_implementation" in d and d["attn_implementation"] not in ("sdpa", None):
            raise ConfigError(
                f"nosa.attn_implementation = {d['attn_implementation']!r}: upstream runs NOSA only "
                f"with 'sdpa'; choose the attention with the `mode` setting instead")
        return cfg

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# Top-level HF keys that do not change the forward math (metadata, training-only settings).
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "bos_token_id",
    "eos_token_id", "pad_token_id", "_name_or_path", "_attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_encoder_decoder",
    "max_position_embeddings", "original_max_position_embeddings", "head_dim", "nosa",
    "rope_scaling", "rope_theta", "mlp_bias", "attention_bias", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "generation_config", "chat_template",
    "use_return_dict", "problem_type", "id2label", "label2id", "task_specific_params",
}
# Keys whose presence with a non-neutral value would change the math in a way not implemented.
_NEUTRAL = {
    "partial_rotary_factor": 1.0,
    "sliding_window": None,
    "use_sliding_window": False,
    "scale_emb": 1,
    "scale_depth": 1.0,
    "dim_model_base": None,
    "quantization_config": None,
    "logits_scaling": 1.0,
    "embedding_multiplier": 1.0,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama backbone fields (spec 1.3) plus the NOSA settings."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    nosa: NosaConfig = dataclasses.field(default_factory=NosaConfig)
    longrope_switch: bool = False  # use long_factor beyond original_max (stock HF); upstream: static short

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config.{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        _validate_rope_scaling(self)

    def __hash__(self):  # rope_scaling is a dict; hash the JSON form so configs can be jit-static
        return hash((json.dumps(self.to_hf_dict(), sort_keys=True), self.longrope_switch))

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (G)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, nosa_overrides: dict | None = None,
                     longrope_switch: bool = False) -> "ModelConfig":
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks required field(s) {missing}")
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ConfigError(
                f"model_type {mt!r} is not supported: NOSA checkpoints use the Llama backbone "
                f"(model_type 'llama')")
        for key, neutral in _NEUTRAL.items():
            if key in d and d[key] != neutral and not (neutral is None and d[key] in (None, {})):
                raise ConfigError(
                    f"config field {key} = {d[key]!r} is not supported (it changes the model math); "
                    f"only {neutral!r} is")
        unknown = sorted(set(d) - _IGNORED_KEYS - set(_NEUTRAL))
        if unknown:
            warnings.warn(f"config.json: ignoring fields that do not affect the Llama/NOSA math: {unknown}",
                          stacklevel=2)
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        rs = d.get("rope_scaling")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=dict(rs) if rs else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            nosa=NosaConfig.from_dict(d.get("nosa"), **(nosa_overrides or {})),
            longrope_switch=longrope_switch,
        )

    @classmethod
    def from_json(cls, path: str | Path, **kw) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d, **kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Llama `config.json` dict that `from_hf_dict` reads back to an equal config."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (None if not self.eos_token_ids else self.eos_token_ids[0]
                             if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)),
            "pad_token_id": self.pad_token_id,
            "nosa": self.nosa.to_dict(),
        }
        if self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        return d


def _validate_rope_scaling(cfg: ModelConfig) -> None:
    rs = cfg.rope_scaling
    if not rs:
        return
    rt = cfg.rope_type
    if rt not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rt!r} is not supported; use one of {ROPE_TYPES}")
    if rt in ("linear", "dynamic", "llama3"):
        f = rs.get("factor")
        if not isinstance(f, (int, float)) or f < 1.0:
            raise ConfigError(f"rope_scaling.factor must be a number >= 1 for {rt!r}, got {f!r}")
    if rt == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in rs:
                raise ConfigError(f"rope_scaling of type 'llama3' needs {k!r}")
        if not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ConfigError("rope_scaling: llama3 needs high_freq_factor > low_freq_factor")
    if rt == "longrope":
        half = cfg.head_dim // 2
        for k in ("short_factor", "long_factor"):
            v = rs.get(k)
            if not isinstance(v, (list, tuple)) or len(v) != half:
                raise ConfigError(
                    f"rope_scaling.{k} must be a list of head_dim/2 = {half} numbers, got "
                    f"{type(v).__name__} of length {len(v) if isinstance(v, (list, tuple)) else '-'}")
        orig = cfg.original_max_position_embeddings or rs.get("original_max_position_embeddings")
        if orig is None and rs.get("factor") is None:
            raise ConfigError("rope_scaling of type 'longrope' needs original_max_position_embeddings "
                              "(top level or inside rope_scaling) or a factor")
    if rt == "dynamic" and not (cfg.original_max_position_embeddings or cfg.max_position_embeddings):
        raise ConfigError("dynamic rope scaling needs max_position_embeddings")


def longrope_original_max(cfg: ModelConfig) -> int:
    rs = cfg.rope_scaling or {}
    return int(cfg.original_max_position_embeddings or rs.get("original_max_position_embeddings")
               or cfg.max_position_embeddings)

