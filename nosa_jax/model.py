"""Flax NNX Llama backbone with NOSA attention (spec sections 1-2).

One set of weights, three attention modes chosen at load time:
  full      dense causal attention (the eviction weights are ignored)
  infllmv2  query-aware block selection (top-k of pooled stage-1 scores), no bias
  nosa      two-stage selection (query-aware picks + eviction-score ranking) and the cis bias

The decoder layers are created stacked (`nnx.vmap`) and run with `nnx.scan`, so compile time does
not grow with depth. Parameter layout (`nnx.state(model).to_pure_dict()`), with L layers:
  embed_tokens.embedding                 [V, H]
  layers.input_layernorm.weight          [L, H]
  layers.self_attn.{q,k,v}_proj.kernel   [L, H, heads*D]   (+ .bias if attention_bias)
  layers.self_attn.o_proj.kernel         [L, Hq*D, H]
  layers.self_attn.A                     [L, Hk]
  layers.self_attn.delta.kernel          [L, Hk*D, Hk]     (+ .bias if attention_bias)
  layers.post_attention_layernorm.weight [L, H]
  layers.mlp.{gate,up}_proj.kernel       [L, H, I]         (+ .bias if mlp_bias)
  layers.mlp.down_proj.kernel            [L, I, H]
  norm.weight                            [H]
  lm_head.kernel                         [H, V]            (absent when embeddings are tied)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import nosa
from .config import ATTENTION_MODES, ModelConfig
from .rope import apply_rope, rope_cos_sin, rope_parameters

_ACT = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times the weight (HF Llama order)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


def _linear(din, dout, bias, dtype, rngs, std=0.02):
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """Static settings of the attention path (part of the model's graph definition)."""

    mode: str = "nosa"
    q_chunk: int = 256  # queries per chunk in the reference path (bounds the dense mask memory)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        Hq, Hk, D, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        b = cfg.attention_bias
        self.q_proj = _linear(H, Hq * D, b, dtype, rngs)
        self.k_proj = _linear(H, Hk * D, b, dtype, rngs)
        self.v_proj = _linear(H, Hk * D, b, dtype, rngs)
        self.o_proj = _linear(Hq * D, H, False, dtype, rngs)
        self.A = nnx.Param(jnp.zeros((Hk,), dtype))
        self.delta = _linear(Hk * D, Hk, b, dtype, rngs)
        self.cfg = cfg

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, T, Hq, D], k, v [B, T, Hk, D] (q, k rotated), cis [B, T, Hk] f32."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        delta_bias = self.delta.bias[...] if self.delta.bias is not None else None
        cis = nosa.compute_cis(v, self.A[...], self.delta.kernel[...], delta_bias)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cis

    def __call__(self, x, cos, sin, kv_len, settings: AttentionSettings):
        """Prefill over a left-aligned batch. Returns (out [B, T, H], block_ids [B, Hk, T, K], cis)."""
        cfg, n = self.cfg, self.cfg.nosa
        B, T, _ = x.shape
        q, k, v, cis = self.project(x, cos, sin)
        mode = settings.mode
        n_blocks = n.num_blocks(T)
        ktilde = nosa.window_means(k, n) if mode != "full" else None
        cisw = nosa.window_means(cis, n) if mode == "nosa" else None
        bias = cis if mode == "nosa" else None

        chunk = min(settings.q_chunk, T)
        n_chunks = -(-T // chunk)
        pad = n_chunks * chunk - T
        q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        pos = jnp.broadcast_to(jnp.arange(n_chunks * chunk, dtype=jnp.int32), (B, n_chunks * chunk))
        qc = jnp.moveaxis(q_pad.reshape(B, n_chunks, chunk, *q.shape[2:]), 1, 0)
        pc = jnp.moveaxis(pos.reshape(B, n_chunks, chunk), 1, 0)

        def one_chunk(args):
            q_i, p_i = args
            ids = None
            if mode != "full":
                ids = nosa.select_blocks(q_i, p_i, ktilde, cisw, kv_len, n_blocks, n, mode)
            o = nosa.attention(q_i, p_i, k, v, kv_len, bias=bias, block_ids=ids,
                               block_size=n.block_size)
            if ids is None:
                ids = jnp.zeros((B, cfg.num_key_value_heads, chunk, 0), jnp.int32)
            return o, ids

        o, ids = jax.lax.map(one_chunk, (qc, pc))
        o = jnp.moveaxis(o, 0, 1).reshape(B, n_chunks * chunk, -1)[:, :T]
        ids = jnp.moveaxis(ids, 0, 2).reshape(B, cfg.num_key_value_heads, n_chunks * chunk, -1)[:, :, :T]
        return self.o_proj(o.astype(x.dtype)), ids, cis


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        H, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(H, I, b, dtype, rngs)
        self.up_proj = _linear(H, I, b, dtype, rngs)
        self.down_proj = _linear(I, H, b, dtype, rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.down_proj(_ACT[self.act](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, kv_len, settings):
        a, ids, cis = self.self_attn(self.input_layernorm(x), cos, sin, kv_len, settings)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, ids, cis


@dataclasses.dataclass
class ForwardOutput:
    """logits [B, P, V] float32; block_ids [B, L, Hk, P, K] int32 (K = 0 in full mode);
    cis [B, L, P, Hk] float32; hidden [B, L + 1, P, H] (embeddings, then each layer's input, then the
    final norm's output) when asked for."""

    logits: jax.Array
    block_ids: jax.Array
    cis: jax.Array
    hidden: jax.Array | None = None


jax.tree_util.register_dataclass(ForwardOutput, data_fields=["logits", "block_ids", "cis", "hidden"],
                                 meta_fields=[])


class NosaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, mode: str = "nosa", dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, q_chunk: int = 256):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.settings = AttentionSettings(mode=mode, q_chunk=q_chunk)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return DecoderLayer(cfg, dtype, rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size,
                                                                    False, dtype, rngs)

    @property
    def mode(self) -> str:
        return self.settings.mode

    def logits(self, h):
        """Final-norm output [..., H] -> float32 logits [..., V]."""
        if self.lm_head is None:
            return jnp.einsum("...h,vh->...v", h, self.embed_tokens.embedding[...]).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, *, return_hidden=False):
        """Teacher-forced forward.

        input_ids: [B, T] int; attention_mask: [B, T] (1 = token, 0 = padding; left, right or any
        padding); positions: [B, P] indices into T of the rows to return (default: all T).
        Each sequence is computed exactly as if alone: tokens are packed to the left, positions and
        block indices are per sequence (no upstream B1/B3).
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = attention_mask.astype(bool)
        order = jnp.argsort(~mask, axis=1, stable=True)  # valid tokens first, original order kept
        rank = jnp.cumsum(mask, axis=1) - 1  # aligned index of each original token
        kv_len = mask.sum(axis=1).astype(jnp.int32)
        ids = jnp.take_along_axis(input_ids, order, axis=1)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        at = jnp.take_along_axis(rank, positions, axis=1)  # [B, P] aligned rows to return
        at = jnp.clip(at, 0, T - 1)

        inv_freq, scaling = rope_parameters(self.cfg, T)
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (B, T)), inv_freq, scaling, self.dtype)
        x = self.embed_tokens(ids)
        settings = self.settings

        def gather_rows(a, axis):  # pick rows `at` along the token axis
            idx = at.reshape((B,) + (1,) * (axis - 1) + (at.shape[1],) + (1,) * (a.ndim - axis - 1))
            return jnp.take_along_axis(a, idx, axis=axis)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run_layers(x, layer):
            y, blk, cis = layer(x, cos, sin, kv_len, settings)
            return y, (gather_rows(blk, 2), gather_rows(cis, 1), gather_rows(x, 1))

        x, (blk, cis, hid) = run_layers(x, self.layers)
        h = self.norm(x)
        h_at = gather_rows(h, 1)
        hidden = None
        if return_hidden:
            hidden = jnp.concatenate([jnp.moveaxis(hid, 0, 1), h_at[:, None]], axis=1).astype(jnp.float32)
        return ForwardOutput(logits=self.logits(h_at), block_ids=jnp.moveaxis(blk, 0, 1),
                             cis=jnp.moveaxis(cis, 0, 1), hidden=hidden)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, Any]:
    """Nested dict of `jax.ShapeDtypeStruct`: the exact parameter layout a checkpoint must fill."""
    model = nnx.eval_shape(lambda: NosaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param).to_pure_dict()


def from_params(cfg: ModelConfig, params: dict[str, Any], *, mode: str = "nosa",
                dtype=None, q_chunk: int = 256) -> NosaForCausalLM:
    """Build a model around a nested dict of arrays in the layout of `abstract_params`."""
    leaves = jax.tree.leaves(params)
    dtype = jnp.dtype(dtype or leaves[0].dtype)
    model = nnx.eval_shape(lambda: NosaForCausalLM(cfg, mode=mode, dtype=dtype, rngs=nnx.Rngs(0),
                                                   q_chunk=q_chunk))
    graphdef, state = nnx.split(model)
    expected = jax.tree.map(lambda a: a.shape, state.to_pure_dict())
    got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("parameter layout does not match the config: expected "
                         f"{expected}, got {got}")
    state.replace_by_pure_dict(jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
    return nnx.merge(graphdef, state)
