"""Flax NNX Llama backbone with NOSA attention (spec sections 1-2).

One set of weights, three attention modes chosen at load time:
  full      dense causal attention (the eviction weights are ignored)
  infllmv2  query-aware block selection (top-k of pooled stage-1 scores), no bias
  nosa      two-stage selection (query-aware picks + eviction-score ranking) and the cis bias

The decoder layers are created stacked (`nnx.vmap`) and run with `nnx.scan`, so compile time does
not grow with depth. Parameter layout (`nnx.to_pure_dict(nnx.state(model))`), with L layers:
  embed_tokens.embedding                 [V, H]
  layers.input_layernorm.weight          [L, H]
  layers.self_attn.qkv_proj.kernel       [L, H, (Hq+2Hk)*D] (+ .bias if attention_bias)
                                         columns: q [Hq*D] | k [Hk*D] | v [Hk*D] (`qkv_widths`)
  layers.self_attn.o_proj.kernel         [L, Hq*D, H]     (+ .bias if attention_bias)
  layers.self_attn.A                     [L, Hk]
  layers.self_attn.delta.kernel          [L, Hk*D, Hk]     (+ .bias if attention_bias)
  layers.post_attention_layernorm.weight [L, H]
  layers.mlp.gate_up_proj.kernel         [L, H, 2I]        (+ .bias if mlp_bias)
                                         columns: gate [I] | up [I] (`gate_up_widths`)
  layers.mlp.down_proj.kernel            [L, I, H]
  norm.weight                            [H]
  lm_head.kernel                         [H, V]            (absent when embeddings are tied)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import nosa
from .cache import Q_CHUNK, KVCache, cache_write, init_cache
from .config import ATTENTION_MODES, ModelConfig, NosaConfig
from .offload import OffloadedKV
from .offload import decode_attend as offload_decode_attend
from .rope import apply_rope, rope_cos_sin, rope_inv_freq

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


def _fused_linear(din, widths, bias, dtype, rngs, std=0.02):
    """One Linear whose output columns are the projections `widths` side by side, initialised as
    separate `_linear`s of those widths would be, drawing the same keys in the same order (a kernel
    key, then a bias key, per part): a random model keeps its weights, and so its selections, when
    projections are fused."""
    kernels = []
    for w in widths:
        kernels.append(nnx.initializers.normal(std)(rngs.params(), (din, w), dtype))
        if bias:
            rngs.params()  # the bias key a separate Linear draws (its bias is zeros)
    kernel = jnp.concatenate(kernels, axis=1)
    return nnx.Linear(din, sum(widths), use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=lambda *_: kernel, rngs=nnx.Rngs(0))


def _dense(linear: nnx.Linear, x):
    """linear(x), with a single row computed as two (itself twice). XLA on the GPU rewrites a one-row
    product whose weight has fewer than ~12.6M elements into reduce fusions instead of a GEMM
    (`bench/probe_gemv.py --grid`, H100, `probe-gemv-grid-s17-h100.log`): with at most 2048 outputs
    as multiply + reduce at ~0.5 TB/s (the 1B model's q/k/v/o/down projections at batch 1 took 2-3.5x
    the cuBLAS time of two rows), with 3072-6144 outputs as one reduce fusion within about 20 % of
    the two-row GEMM either way. So only products of at most 2048 outputs get the second row; where
    a wider product is slow, fuse it with its neighbours instead (the 1B gate/up: two 4096-wide
    reduce fusions, one 8192-wide GEMM)."""
    if math.prod(x.shape[:-1]) != 1 or linear.out_features > 2048:
        return linear(x)
    return linear(jnp.concatenate([x, x], axis=0))[:1]


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """Static settings of the attention path (part of the model's graph definition)."""

    mode: str = "nosa"
    # Queries per selection / attention call in prefill (bounds their temporaries). None: the
    # implementation's own default, Q_CHUNK[impl].
    q_chunk: int | None = None
    impl: str = "reference"  # "reference" (plain jnp) or "pallas" (GPU kernels)
    interpret: bool = False  # run the pallas kernels in interpret mode (CPU tests)
    # Unroll of the scan over layers (True: a straight-line program). "auto": straight-line for a
    # decode step against the offloaded cache, or against the on-device cache where the Pallas
    # cache write updates it in place; the scan otherwise. Measured (same call, bench/NOTES.md
    # sessions 18-19), 16K, batch 16: the 1B offloaded step 4.38 -> 3.97 ms (H100), the 8B one
    # within the spread between processes; on the device, the Pallas write and unrolled layers
    # against XLA's scatters and the scan: 1B 3.40 -> 3.30 ms (H100; batch 1 2.79 -> 2.53), 8B
    # 8.44 -> 8.17 ms (H100), 6.72 -> 6.50 ms (H200); with XLA's scatters the unrolled 1B on-device
    # step took 89.9 ms (each layer copied the whole stacked cache).
    layer_unroll: int | bool | str = "auto"

    def unroll_for(self, cache, n_tokens: int) -> int | bool:
        """The scan's unroll for `n_tokens` new tokens per sequence against `cache`."""
        if self.layer_unroll != "auto":
            return self.layer_unroll
        if n_tokens == 1 and isinstance(cache, OffloadedKV):
            return True
        if self.impl == "pallas":  # the on-device cache: straight-line where its write is in place
            from pallas_kernels import cache_write as cw

            return True if cw.in_place(n_tokens) else 1
        return 1


def qkv_widths(cfg: ModelConfig) -> tuple[int, int, int]:
    """Column widths of q, k and v, in this order, in the fused `qkv_proj` parameter."""
    return (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim)


def gate_up_widths(cfg: ModelConfig) -> tuple[int, int]:
    """Column widths of gate and up, in this order, in the fused `gate_up_proj` parameter."""
    return (cfg.intermediate_size, cfg.intermediate_size)


# Fused parameters: projections of one input stored side by side along the output axis, so that
# one GEMM computes them (one launch, one pass over the input; at decode batch 16 the fused 8B
# gate/up GEMM took 90.1 us against 92.9 for two, `bench/results/probe-mlp-2026-12-06`).
# {(module, fused name): ((upstream names in column order), column widths)}; the converter and
# the loader of older converted checkpoints read the layout from here.
FUSED_PARAMS = {("self_attn", "qkv_proj"): (("q_proj", "k_proj", "v_proj"), qkv_widths),
                ("mlp", "gate_up_proj"): (("gate_proj", "up_proj"), gate_up_widths)}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        Hq, Hk, D, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        b = cfg.attention_bias
        self.qkv_proj = _linear(H, sum(qkv_widths(cfg)), b, dtype, rngs)  # one GEMM for q, k and v
        self.o_proj = _linear(Hq * D, H, b, dtype, rngs)
        self.A = nnx.Param(jnp.zeros((Hk,), dtype))
        self.delta = _linear(Hk * D, Hk, b, dtype, rngs)
        self.cfg = cfg

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, T, Hq, D], k, v [B, T, Hk, D] (q, k rotated), cis [B, T, Hk] f32,
        and the projection itself as heads [B, T, Hq + 2 Hk, D] (its last Hk heads are v)."""
        cfg = self.cfg
        B, T, _ = x.shape
        wq, wk, _ = qkv_widths(cfg)
        qkv = _dense(self.qkv_proj, x)
        q = qkv[..., :wq].reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = qkv[..., wq:wq + wk].reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = qkv[..., wq + wk:].reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        delta_bias = self.delta.bias[...] if self.delta.bias is not None else None
        cis = nosa.compute_cis(v, self.A[...], self.delta.kernel[...], delta_bias)
        heads = qkv.reshape(B, T, -1, cfg.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cis, heads

    def __call__(self, x, cos, sin, layer: jax.Array, cache: KVCache, start: jax.Array,
                 settings: AttentionSettings):
        """Extend each sequence by the tokens of `x` and attend (prefill, chunked prefill, decode).

        x: [B, Tc, H], tokens at positions start[b] .. start[b] + Tc - 1 (entries past a sequence's
        new length `cache.length` are padding); layer: this layer's index into the stacked cache.
        Returns (out [B, Tc, H], block_ids [B, Hk, Tc, K], cis [B, Tc, Hk], updated cache).
        The cache is a `KVCache` (on the device) or an `OffloadedKV` (decode only, Tc == 1).
        """
        q, k, v, cis, heads = self.project(x, cos, sin)
        # the Pallas kernels read v from `heads`: a slice of the projection handed to a kernel is a copy
        if isinstance(cache, OffloadedKV):  # decode against the host-offloaded cache
            o, ids, cache = offload_decode_attend(q, k, heads, cis, layer, cache, start, self.cfg.nosa, settings)
        elif settings.impl == "pallas":
            from pallas_kernels import decode_cache_write  # cache_write, or its one-kernel decode path

            cache = decode_cache_write(cache, layer, start, k, heads, cis, self.cfg.nosa, interpret=settings.interpret)
            o, ids, cache = attend_pallas(q, layer, cache, start, self.cfg.nosa, settings)
        else:
            cache = cache_write(cache, layer, start, k, v, cis, self.cfg.nosa)
            o, ids = attend(q, layer, cache, start, self.cfg.nosa, settings)
        B, Tc = x.shape[:2]
        return _dense(self.o_proj, o.reshape(B, Tc, -1).astype(x.dtype)), ids, cis, cache


def map_query_chunks(fn, q, q_pos, chunk: int):
    """Run fn(q_i [B, c, Hq, D], pos_i [B, c]) -> (o_i [B, c, Hq, D], ids_i [B, Hk, c, K]) over
    chunks of `chunk` queries (`lax.map`: bounds the memory of selection and dense masks) and
    reassemble [B, Tc, Hq, D], [B, Hk, Tc, K]. Padding queries repeat the last position."""
    B, Tc, Hq, D = q.shape
    chunk = min(chunk, Tc)
    n_chunks = -(-Tc // chunk)
    pad = n_chunks * chunk - Tc
    qc = jnp.moveaxis(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n_chunks, chunk, Hq, D), 1, 0)
    pc = jnp.moveaxis(jnp.pad(q_pos, ((0, 0), (0, pad)), mode="edge").reshape(B, n_chunks, chunk), 1, 0)
    o, ids = jax.lax.map(lambda a: fn(*a), (qc, pc))
    o = jnp.moveaxis(o, 0, 1).reshape(B, n_chunks * chunk, Hq, D)[:, :Tc]
    ids = jnp.moveaxis(ids, 0, 2)
    ids = ids.reshape(ids.shape[:2] + (n_chunks * chunk, ids.shape[-1]))[:, :, :Tc]
    return o, ids


IMPLS = ("auto", "reference", "pallas")


def resolve_impl(impl: str, interpret: bool = False) -> str:
    """"auto" -> "pallas" on a GPU, else "reference" (interpret mode forces nothing: it is a test aid)."""
    if impl not in IMPLS:
        raise ValueError(f"attention implementation must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl == "pallas" and jax.default_backend() != "gpu" and not interpret:
        raise ValueError("impl='pallas' needs a GPU (or interpret=True for CPU testing); use impl='reference'")
    return impl


def attend(q, layer, cache: KVCache, start, n: NosaConfig, settings: AttentionSettings):
    """Selection and attention of the queries q [B, Tc, Hq, D] at positions start + arange(Tc)
    against layer `layer` of the cache (already holding these tokens).

    Decode (Tc == 1) gathers the selected blocks; longer chunks use dense masks, `q_chunk` queries
    at a time. Returns (o [B, Tc, Hq, D], block_ids [B, Hk, Tc, K]); K = 0 in full mode.
    """
    mode = settings.mode
    B, Tc, Hq, D = q.shape
    Hk = cache.k.shape[3]
    n_blocks = cache.k.shape[2] // n.block_size
    kv_len = cache.length
    q_pos = start[:, None] + jnp.arange(Tc, dtype=jnp.int32)
    k_l, v_l = cache.k[layer], cache.v[layer]
    ktilde = cache.ktilde[layer] if mode != "full" else None
    cisw = cache.cisw[layer] if mode == "nosa" else None
    bias = cache.cis[layer] if mode == "nosa" else None

    def select(q_i, p_i):
        if mode == "full":
            return jnp.zeros((B, Hk, q_i.shape[1], 0), jnp.int32)
        return nosa.select_blocks(q_i, p_i, ktilde, cisw, kv_len, n_blocks, n, mode)

    if Tc == 1:
        with jax.named_scope("nosa_select"):  # named scopes: profiler labels (bench/throughput.py)
            ids = select(q, q_pos)
        with jax.named_scope("nosa_attend"):
            if mode == "full":
                o = nosa.attention(q, q_pos, k_l, v_l, kv_len)
            else:
                o = nosa.gathered_block_attention(q[:, 0], q_pos[:, 0], k_l, v_l, bias, ids[:, :, 0],
                                                  n.block_size)[:, None]
        return o, ids

    def one_chunk(q_i, p_i):
        ids = select(q_i, p_i)
        o = nosa.attention(q_i, p_i, k_l, v_l, kv_len, bias=bias,
                           block_ids=None if mode == "full" else ids, block_size=n.block_size)
        return o, ids

    return map_query_chunks(one_chunk, q, q_pos, settings.q_chunk or Q_CHUNK["reference"])


def attend_pallas(q, layer, cache: KVCache, start, n: NosaConfig, settings: AttentionSettings):
    """`attend` with the Pallas kernels: selection and block-sparse attention read the stacked
    cache in place (no per-layer slice), for decode and for prefill chunks. Same results as `attend`
    (up to float32 near ties at a top-k boundary); returns (o, ids, cache): the decode kernel's split
    counter is carried in the cache (`KVCache.merge_count`)."""
    from pallas_kernels import decode_select, prefill_select, sparse_decode_attention, sparse_prefill_attention

    mode, interp = settings.mode, settings.interpret
    B, Tc, Hq, D = q.shape
    Hk = cache.k.shape[3]
    n_blocks = cache.k.shape[2] // n.block_size
    kv_len = cache.length
    q_pos = start[:, None] + jnp.arange(Tc, dtype=jnp.int32)
    bias = cache.cis if mode == "nosa" else None
    if Tc == 1:
        pos = q_pos[:, 0]
        if mode == "full":  # dense decode = every causal block
            ids = jnp.arange(n_blocks, dtype=jnp.int32)[None, None, :]
            ids = jnp.broadcast_to(jnp.where(ids <= (pos // n.block_size)[:, None, None], ids, -1), (B, Hk, n_blocks))
        else:
            with jax.named_scope("nosa_select"):  # named scopes: profiler labels (bench/throughput.py)
                ids = decode_select(q[:, 0], cache.ktilde, cache.cisw if mode == "nosa" else None,
                                    nosa.num_windows(kv_len, n), kv_len, layer, nosa_cfg=n, n_blocks=n_blocks,
                                    mode=mode, interpret=interp)
        with jax.named_scope("nosa_attend"):
            o, count = sparse_decode_attention(q[:, 0], cache.k, cache.v, bias, ids, ids, pos, layer,
                                               block_size=n.block_size, interpret=interp, count=cache.merge_count)
        ids = ids[:, :, None] if mode != "full" else jnp.zeros((B, Hk, 1, 0), jnp.int32)
        return o[:, None], ids, dataclasses.replace(cache, merge_count=count)

    def one_chunk(q_i, p_i):
        ids = None if mode == "full" else prefill_select(
            q_i, p_i, cache.ktilde, cache.cisw if mode == "nosa" else None, kv_len, layer, nosa_cfg=n,
            n_blocks=n_blocks, mode=mode, interpret=interp)
        o = sparse_prefill_attention(q_i, p_i, cache.k, cache.v, bias, ids, kv_len, layer,
                                     block_size=n.block_size, interpret=interp)
        return o, (jnp.zeros((B, Hk, q_i.shape[1], 0), jnp.int32) if ids is None else ids)

    return *map_query_chunks(one_chunk, q, q_pos, settings.q_chunk or Q_CHUNK["pallas"]), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        H, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = _fused_linear(H, gate_up_widths(cfg), b, dtype, rngs)  # one GEMM for gate and up
        self.down_proj = _linear(I, H, b, dtype, rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        gate, up = jnp.split(_dense(self.gate_up_proj, x), 2, axis=-1)  # columns gate | up, equal widths
        return _dense(self.down_proj, _ACT[self.act](gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, layer, cache, start, settings):
        a, ids, cis, cache = self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, start, settings)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, ids, cis, cache


@dataclasses.dataclass
class ForwardOutput:
    """logits [B, P, V] float32; block_ids [B, L, Hk, P, K] int32 (ascending ids then -1; K = 0 in
    full mode); cis [B, L, P, Hk] float32; hidden [B, L + 1, P, H] (embeddings, each later layer's
    input, the final norm's output) when asked for; nll [B, T] float32 (aligned: entry i is
    -log p(token i+1 | tokens <= i) of the sequence, NaN past its end) when asked for."""

    logits: jax.Array
    block_ids: jax.Array
    cis: jax.Array
    hidden: jax.Array | None = None
    nll: jax.Array | None = None


jax.tree_util.register_dataclass(ForwardOutput, data_fields=["logits", "block_ids", "cis", "hidden", "nll"],
                                 meta_fields=[])


@dataclasses.dataclass
class ExtendOutput:
    """h [B, R, H] final-norm output at the requested rows; block_ids [L, B, Hk, R, K];
    cis [L, B, R, Hk]; layer_inputs [L, B, R, H] (each layer's input at those rows)."""

    h: jax.Array
    block_ids: jax.Array
    cis: jax.Array
    layer_inputs: jax.Array
    cache: KVCache


jax.tree_util.register_dataclass(ExtendOutput, data_fields=["h", "block_ids", "cis", "layer_inputs", "cache"],
                                 meta_fields=[])


class NosaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, mode: str = "nosa", dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, q_chunk: int | None = None, impl: str = "auto",
                 interpret: bool = False, layer_unroll: int | bool | str = "auto"):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if not (layer_unroll == "auto" or layer_unroll is True
                or (type(layer_unroll) is int and layer_unroll >= 1)):
            raise ValueError(f"layer_unroll must be 'auto', True (a straight-line program) or an int >= 1, "
                             f"got {layer_unroll!r}")
        if q_chunk is not None and (type(q_chunk) is not int or q_chunk < 1):
            raise ValueError(f"q_chunk must be a positive int (queries per prefill call) or None, got {q_chunk!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.settings = AttentionSettings(mode=mode, q_chunk=q_chunk, impl=resolve_impl(impl, interpret),
                                          interpret=interpret, layer_unroll=layer_unroll)
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

    def init_cache(self, batch: int, capacity: int, rope_len=None) -> KVCache:
        return init_cache(self.cfg, batch, capacity, self.dtype, self.mode, rope_len)

    def logits(self, h):
        """Final-norm output [..., H] -> float32 logits [..., V]."""
        if self.lm_head is None:
            return jnp.einsum("...h,vh->...v", h, self.embed_tokens.embedding[...]).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def extend(self, input_ids, start, n_valid, cache: KVCache, rows=None, embeds=None) -> ExtendOutput:
        """Append tokens to every sequence of the cache and run all layers over them.

        input_ids: [B, Tc] tokens at positions start[b] .. start[b] + Tc - 1; only the first
        n_valid[b] of a row are real (the rest is padding). rows: [B, R] indices into Tc whose
        outputs are returned (default: all Tc). embeds: [B, Tc, H] the first layer's input instead
        of the token embeddings (input_ids is then ignored; tests feed one layer another model's
        hidden states). One code path serves prefill, chunked prefill and decode (Tc = 1).
        """
        B, Tc = input_ids.shape if embeds is None else embeds.shape[:2]
        if rows is None:
            rows = jnp.broadcast_to(jnp.arange(Tc), (B, Tc))
        inv_freq, scaling = rope_inv_freq(self.cfg, cache.rope_len)
        pos = start[:, None] + jnp.arange(Tc, dtype=jnp.int32)
        cos, sin = rope_cos_sin(pos, inv_freq, scaling, self.dtype)
        cache = dataclasses.replace(cache, length=(start + n_valid).astype(jnp.int32))
        x = self.embed_tokens(input_ids) if embeds is None else embeds.astype(self.dtype)
        settings = self.settings

        def at_rows(a, axis):
            idx = rows.reshape((B,) + (1,) * (axis - 1) + (rows.shape[1],) + (1,) * (a.ndim - axis - 1))
            return jnp.take_along_axis(a, idx, axis=axis)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=settings.unroll_for(cache, Tc))
        def run_layers(carry, layer, idx):
            x, cache = carry
            y, ids, cis, cache = layer(x, cos, sin, idx, cache, start, settings)
            return (y, cache), (at_rows(ids, 2), at_rows(cis, 1), at_rows(x, 1))

        # The layer indices as a NumPy constant, not jnp.arange's iota: in the straight-line program
        # XLA folds each layer's slice of a constant into a literal, but keeps a slice of an iota as a
        # kernel that writes the index (one launch per layer, ~1 us each, in the 8B offloaded step).
        (x, cache), (ids, cis, hid) = run_layers((x, cache), self.layers,
                                                  np.arange(self.cfg.num_hidden_layers, dtype=np.int32))
        return ExtendOutput(h=self.norm(at_rows(x, 1)), block_ids=ids, cis=cis, layer_inputs=hid, cache=cache)

    def __call__(self, input_ids, attention_mask=None, positions=None, *, return_hidden=False,
                 return_nll=False) -> ForwardOutput:
        """Teacher-forced forward over whole sequences (a prefill into a fresh cache).

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
        rows = jnp.clip(jnp.take_along_axis(rank, positions, axis=1), 0, T - 1)

        out = self.extend(ids, jnp.zeros((B,), jnp.int32), kv_len, self.init_cache(B, T, kv_len), rows=rows)
        k_width = 0 if self.mode == "full" else min(self.cfg.nosa.topk, self.cfg.nosa.num_blocks(T))
        hidden = nll = None
        if return_hidden:
            hidden = jnp.concatenate([jnp.moveaxis(out.layer_inputs, 0, 1), out.h[:, None]], axis=1)
            hidden = hidden.astype(jnp.float32)
        if return_nll:
            full = (self.extend(ids, jnp.zeros((B,), jnp.int32), kv_len, self.init_cache(B, T, kv_len))
                    if rows.shape[1] != T else out)
            nll = self.token_nll(full.h, ids, kv_len)
        return ForwardOutput(logits=self.logits(out.h), block_ids=jnp.moveaxis(out.block_ids, 0, 1)[..., :k_width],
                             cis=jnp.moveaxis(out.cis, 0, 1), hidden=hidden, nll=nll)

    def token_nll(self, h, ids, kv_len, chunk: int = 512):
        """-log p(ids[i+1] | <= i) for each aligned row i < kv_len - 1 (NaN elsewhere); the vocab
        projection runs `chunk` rows at a time so [T, V] logits are never held at once."""
        B, T, H = h.shape
        n = -(-T // chunk)
        hp = jnp.pad(h, ((0, 0), (0, n * chunk - T), (0, 0)))
        tgt = jnp.pad(ids[:, 1:], ((0, 0), (0, n * chunk - T + 1)))

        def one(args):
            h_i, t_i = args
            lg = self.logits(h_i)
            return jax.nn.logsumexp(lg, axis=-1) - jnp.take_along_axis(lg, t_i[..., None], axis=-1)[..., 0]

        nll = jax.lax.map(one, (jnp.moveaxis(hp.reshape(B, n, chunk, H), 1, 0),
                                jnp.moveaxis(tgt.reshape(B, n, chunk), 1, 0)))
        nll = jnp.moveaxis(nll, 0, 1).reshape(B, n * chunk)[:, :T]
        return jnp.where(jnp.arange(T) < (kv_len - 1)[:, None], nll, jnp.nan)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, Any]:
    """Nested dict of `jax.ShapeDtypeStruct`: the exact parameter layout a checkpoint must fill."""
    model = nnx.eval_shape(lambda: NosaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def from_params(cfg: ModelConfig, params: dict[str, Any], *, mode: str = "nosa", dtype=None,
                q_chunk: int | None = None, impl: str = "auto", interpret: bool = False,
                layer_unroll: int | bool | str = "auto") -> NosaForCausalLM:
    """Build a model around a nested dict of arrays in the layout of `abstract_params`."""
    leaves = jax.tree.leaves(params)
    dtype = jnp.dtype(dtype or leaves[0].dtype)
    model = nnx.eval_shape(lambda: NosaForCausalLM(cfg, mode=mode, dtype=dtype, rngs=nnx.Rngs(0),
                                                   q_chunk=q_chunk, impl=impl, interpret=interpret,
                                                   layer_unroll=layer_unroll))
    graphdef, state = nnx.split(model)
    expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:
        problems = [f"{k}: expected {expected[k]}, got {got.get(k, 'missing')}" for k in expected if expected[k] != got.get(k)]
        problems += [f"{k}: unexpected" for k in got if k not in expected]
        raise ValueError("parameters do not match the config: " + "; ".join(problems[:10]))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
    return nnx.merge(graphdef, state)
