"""The device KV cache: keys, values, eviction scores and their compressed windows.

A `KVCache` is a plain pytree of arrays stacked over layers, so it can be donated to a jitted
step, carried through the jitted decode loop and sharded later. Shapes (L layers, B sequences,
T = allocated tokens, C = allocated windows):
  k, v     [L, B, T, Hk, D]  model dtype   post-RoPE keys, values
  cis      [L, B, T, Hk]     float32       eviction scores
  ktilde   [L, B, C, Hk, D]  model dtype   compressed keys (window means accumulated in float32,
                                           rounded to the model dtype as upstream; spec 2.3);
                                           C = 0 in `full` mode
  cisw     [L, B, C, Hk]     float32       cis window means; C = 0 unless `nosa` mode
  length   [B]               int32         tokens held per sequence
  rope_len [B]               int32         each sequence's final length (length-dependent RoPE)
  merge_count [B, Hk]        int32         always zero between calls: the Pallas decode kernel's split
                                           counter (`sparse_decode_attention(count=...)`), carried
                                           through the layers and steps so that no step zeroes one

Compressed windows are maintained incrementally (spec 2.3, 2.6): when tokens [start, start + Tc)
are written, exactly the windows they complete are recomputed from the keys already in the cache
(O(Tc) work), with the same arithmetic as a from-scratch computation, so decode equals recompute
(no upstream B4/B6 lag or loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import nosa
from .config import ModelConfig, NosaConfig


@dataclasses.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    cis: jax.Array
    ktilde: jax.Array
    cisw: jax.Array
    length: jax.Array
    rope_len: jax.Array  # [B] length at which length-dependent RoPE is evaluated per sequence
    merge_count: jax.Array  # [B, Hk] zeros: the decode kernel's carried split counter
    capacity: int  # tokens a sequence may hold (static)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "cis", "ktilde", "cisw", "length", "rope_len",
                                                       "merge_count"], meta_fields=["capacity"])


def allocation(cfg: ModelConfig, capacity: int) -> tuple[int, int]:
    """(tokens, windows) to allocate for `capacity` tokens per sequence.

    Tokens: capacity rounded up to whole blocks (writes and window reads past the end are dropped or
    read as zeros; they only ever concern padding). Windows: enough for every window a chunk can
    touch.
    """
    n = cfg.nosa
    t_alloc = -(-capacity // n.block_size) * n.block_size
    return t_alloc, t_alloc // n.kernel_stride + 2


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype, mode: str, rope_len=None) -> KVCache:
    """A zeroed cache. `rope_len` [B]: each sequence's final length, used only by length-dependent
    RoPE types (dynamic, switching LongRoPE); default: the capacity."""
    L, Hk, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    T, C = allocation(cfg, capacity)
    c_k = C if mode != "full" else 0
    c_cis = C if mode == "nosa" else 0
    return KVCache(
        k=jnp.zeros((L, batch, T, Hk, D), dtype),
        v=jnp.zeros((L, batch, T, Hk, D), dtype),
        cis=jnp.zeros((L, batch, T, Hk), jnp.float32),
        ktilde=jnp.zeros((L, batch, c_k, Hk, D), dtype),
        cisw=jnp.zeros((L, batch, c_cis, Hk), jnp.float32),
        length=jnp.zeros((batch,), jnp.int32),
        rope_len=(jnp.full((batch,), capacity, jnp.int32) if rope_len is None
                  else jnp.asarray(rope_len, jnp.int32).reshape(batch)),
        merge_count=jnp.zeros((batch, Hk), jnp.int32),
        capacity=capacity,
    )


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype, mode: str) -> int:
    """Bytes `init_cache` would allocate (for capacity checks before allocating)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, capacity, dtype, mode))
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(shapes))


# Prompt tokens per prefill call when the caller gives no prefill_chunk (`Generator.start`). A call's
# activations grow with its length (at 8B the MLP alone holds 3 x 16384 values per token: 96 KB in
# bf16, 12 GiB for one 128K-token prompt in one call); at 4096 XLA's temporaries are under 0.5 GiB
# per sequence (`prefill_activation_bytes`), and the GEMMs are still compute-bound. Shorter prompts
# go in one call.
DEFAULT_PREFILL_CHUNK = 4096

# Default queries per prefill call of the selection and attention, by implementation
# (AttentionSettings.q_chunk None). The reference holds [Hq, q_chunk, windows] float32 logits per
# call (16x the window scores at G = 16); the Pallas path holds [Hk, q_chunk, windows] scores and
# [Hk, q_chunk, blocks] pooled rows, so 2048 of its queries take less memory than 256 of the
# reference's (`prefill_activation_bytes` counts both), and fewer, larger calls fill the GPU: the
# 32K prompt's Pallas selection took 9.27 ms in calls of 256 queries and 4.72 ms in calls of 4096 on
# an H100 (bench/NOTES.md, session 29).
Q_CHUNK = {"reference": 256, "pallas": 2048}


def prefill_activation_bytes(cfg: ModelConfig, capacity: int, dtype, mode: str,
                             chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """Estimated device bytes one sequence's prefill call of `chunk` tokens holds beside its cache
    (the GPU path's temporaries): the larger of the MLP's values (gate, up and their product,
    [chunk, intermediate] each) and one query chunk's selection at either implementation's default
    `Q_CHUNK` (reference: [Hq, q_chunk, windows] float32 logits - XLA fuses their exponentials into
    the reductions -, the group sum and the [Hk, q_chunk, blocks] pooled, bias and top-k rows;
    Pallas: [Hk, q_chunk, blocks * P] window scores, the pooled stage-1 and cis rows and the top-k's
    flattened copies of both),
    plus the chunk's q/k/v (and their rotated copies), float32 hidden states and the last logits.
    An estimate, held against XLA's memory analysis by a GPU test and bench/probe_prefill_memory.py:
    on the H100 at 8B / 128K, chunks of 4096, XLA's temporaries are 0.41 GiB for one sequence and
    0.48 GiB per sequence for groups of 2 to 9, against 0.70 here; 1B / 16K: 0.14 and 0.12 against
    0.22 (bench/results/probe-prefill-memory-s13-*)."""
    it = jnp.dtype(dtype).itemsize
    T, C = allocation(cfg, capacity)
    tc = min(chunk, T)
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    nb = T // cfg.nosa.block_size
    mlp = 3 * tc * cfg.intermediate_size * it
    select = 0 if mode == "full" else max(
        min(Q_CHUNK["reference"], tc) * (hq * C + hk * C + 8 * hk * nb) * 4,
        min(Q_CHUNK["pallas"], tc) * hk * (nb * cfg.nosa.pool_stride + 4 * nb) * 4)
    rest = tc * (2 * (hq + 2 * hk) * d * it + 4 * cfg.hidden_size * 4) + 2 * cfg.vocab_size * 4
    return max(mlp, select) + rest


def new_windows(x: jax.Array, new: jax.Array, start: jax.Array, n_windows: int,
                n: NosaConfig) -> tuple[jax.Array, jax.Array]:
    """Window means of the `n_windows` windows from the first one a chunk at `start` can complete,
    as they are once the chunk is written: tokens start[b] .. start[b] + Tc - 1 come from `new`,
    the others from `x` (the cache before the write), so the means do not wait for the write.

    x: [B, T, ...] (one layer); new: [B, Tc, ...] in x's dtype; start: [B]. Returns (first window
    index [B], means [B, W, ...] float32). Tokens at or past T read 0, as a write there is dropped.
    """
    T, Tc = x.shape[1], new.shape[1]
    c0 = nosa.num_windows(start, n)
    span = (n_windows - 1) * n.kernel_stride + n.kernel_size

    def one(x_b, new_b, s, c):
        idx = c * n.kernel_stride + jnp.arange(span)
        # a gather, not a dynamic_slice: a slice running past the end would be shifted back and
        # corrupt complete windows; out-of-range rows read 0 and only feed windows past the end
        seg = jnp.take(x_b, idx, axis=0, mode="fill", fill_value=0)
        mine = (idx >= s) & (idx < s + Tc) & (idx < T)
        fresh = jnp.take(new_b, jnp.clip(idx - s, 0, Tc - 1), axis=0)
        seg = jnp.where(mine.reshape((span,) + (1,) * (x.ndim - 2)), fresh, seg)
        return nosa.window_means(seg[None], n)[0]

    return c0, jax.vmap(one)(x, new, start, c0)


def window_rows(cache: KVCache, layer, start: jax.Array, k: jax.Array, cis: jax.Array, n_windows: int,
                n: NosaConfig) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The rows of the compressed windows a write of k [B, Tc, Hk, D] (in the cache's dtype) and
    cis [B, Tc, Hk] at `start` refreshes, `n_windows` per sequence from the first one it can
    complete: (first window index [B], ktilde rows [B, W, Hk, D] in ktilde's dtype or None when
    the cache keeps no compressed keys, cisw rows [B, W, Hk] float32 or None likewise)."""
    c0 = nosa.num_windows(start, n)
    kt_rows = cw_rows = None
    if cache.ktilde.shape[2]:
        # float32 means rounded (to nearest) to the model dtype, as upstream stores them
        kt_rows = new_windows(cache.k[layer], k, start, n_windows, n)[1].astype(cache.ktilde.dtype)
    if cache.cisw.shape[2]:
        cw_rows = new_windows(cache.cis[layer], cis, start, n_windows, n)[1]
    return c0, kt_rows, cw_rows


def cache_write(cache: KVCache, layer, start: jax.Array, k: jax.Array, v: jax.Array, cis: jax.Array,
                n: NosaConfig) -> KVCache:
    """Write tokens at positions start[b] + arange(Tc) of layer `layer` and refresh the windows
    they complete. k, v: [B, Tc, Hk, D]; cis: [B, Tc, Hk]. `cache.length` must already hold the
    new lengths; tokens past them are padding and land in the unused tail."""
    B, Tc = k.shape[:2]
    b_idx = jnp.arange(B)[:, None]
    pos = start[:, None] + jnp.arange(Tc, dtype=jnp.int32)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    W = Tc // n.kernel_stride + 1
    c0, kt_rows, cw_rows = window_rows(cache, layer, start, k, cis, W, n)
    w_idx = c0[:, None] + jnp.arange(W)
    kt, cw = cache.ktilde, cache.cisw
    if kt_rows is not None:
        kt = kt.at[layer, b_idx, w_idx].set(kt_rows, mode="drop")
    if cw_rows is not None:
        cw = cw.at[layer, b_idx, w_idx].set(cw_rows, mode="drop")
    # padding tokens of a chunk may run past the allocation: those writes are dropped
    kc = cache.k.at[layer, b_idx, pos].set(k, mode="drop")
    vc = cache.v.at[layer, b_idx, pos].set(v, mode="drop")
    cc = cache.cis.at[layer, b_idx, pos].set(cis, mode="drop")
    return dataclasses.replace(cache, k=kc, v=vc, cis=cc, ktilde=kt, cisw=cw)
