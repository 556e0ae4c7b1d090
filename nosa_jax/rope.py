"""Rotary position embeddings: inverse frequencies for each supported `rope_scaling` type, and
their application (GPT-NeoX "rotate half" layout, as the HF Llama model and upstream NOSA use).

Types: default, linear, dynamic (NTK), llama3, longrope. LongRoPE follows upstream NOSA by
default: its rotary class computes the frequencies once without a sequence length, so it always
uses `short_factor` (spec section 8); `ModelConfig.longrope_switch=True` switches to `long_factor`
for sequences longer than `original_max_position_embeddings`, as stock transformers does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, longrope_original_max


def rope_parameters(cfg: ModelConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [head_dim/2] float32, attention_scaling).

    `seq_len` (the total sequence length) matters only for `dynamic` and for `longrope` with
    `longrope_switch`; the others ignore it.
    """
    dim = cfg.head_dim
    base = cfg.rope_theta
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    rs = cfg.rope_scaling or {}
    rt = cfg.rope_type
    scaling = 1.0
    if rt == "default":
        inv = 1.0 / (base ** exponent)
    elif rt == "linear":
        inv = 1.0 / (base ** exponent) / float(rs["factor"])
    elif rt == "dynamic":
        factor = float(rs["factor"])
        orig = int(cfg.original_max_position_embeddings or cfg.max_position_embeddings)
        n = max(int(seq_len or 0), orig)
        if n > orig:
            base = base * ((factor * n / orig) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** exponent)
    elif rt == "llama3":
        inv = 1.0 / (base ** exponent)
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif rt == "longrope":
        orig = longrope_original_max(cfg)
        if cfg.original_max_position_embeddings is not None or "original_max_position_embeddings" in rs:
            factor = cfg.max_position_embeddings / orig
        else:
            factor = float(rs["factor"])
        scaling = rs.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        use_long = cfg.longrope_switch and seq_len is not None and seq_len > orig
        ext = np.asarray(rs["long_factor" if use_long else "short_factor"], np.float32)
        inv = 1.0 / (ext * base ** exponent)
    else:  # validated in ModelConfig
        raise AssertionError(rt)
    return np.asarray(inv, np.float32), float(scaling)


def length_dependent(cfg: ModelConfig) -> bool:
    """Whether the frequencies depend on the sequence length (dynamic NTK, switching LongRoPE)."""
    return cfg.rope_type == "dynamic" or (cfg.rope_type == "longrope" and cfg.longrope_switch)


def rope_inv_freq(cfg: ModelConfig, lengths: jax.Array) -> tuple[jax.Array, float]:
    """Per-sequence inverse frequencies [B, head_dim/2] for sequences of total lengths [B].

    Length-dependent types are evaluated at each sequence's own length, so a padded batch equals
    each sequence alone and a decode equals a recompute over the same final length.
    """
    inv, scaling = rope_parameters(cfg)
    B = lengths.shape[0]
    if not length_dependent(cfg):
        return jnp.broadcast_to(jnp.asarray(inv), (B, inv.shape[0])), scaling
    n = lengths.astype(jnp.float32)[:, None]
    if cfg.rope_type == "dynamic":
        rs, dim = cfg.rope_scaling, cfg.head_dim
        factor = float(rs["factor"])
        orig = float(cfg.original_max_position_embeddings or cfg.max_position_embeddings)
        exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        base = cfg.rope_theta * jnp.where(n > orig, (factor * n / orig) - (factor - 1), 1.0) ** (dim / (dim - 2))
        return (1.0 / base ** exponent).astype(jnp.float32), scaling
    orig = longrope_original_max(cfg)
    long_inv, _ = rope_parameters(cfg, seq_len=orig + 1)
    return jnp.where(n > orig, jnp.asarray(long_inv), jnp.asarray(inv)), scaling


def rope_cos_sin(positions: jax.Array, inv_freq, scaling: float, dtype) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] with inv_freq [D/2] or [B, D/2] -> cos, sin [B, T, head_dim] (float32
    math, then cast to `dtype` as HF does)."""
    inv_freq = jnp.asarray(inv_freq)
    inv_freq = inv_freq[:, None, :] if inv_freq.ndim == 2 else inv_freq
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; cos/sin [B, T, D]. x*cos + rotate_half(x)*sin in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
