"""The decode step's cache writes in one Pallas Triton kernel (`decode_cache_write`).

A decode step writes, per layer and sequence, one token: its key, value and eviction score at row
`pos`, and the window that token may complete (the compressed key and the window's mean score at
window `c0 = num_windows(pos)`). `nosa_jax.cache.cache_write` does that with five XLA scatters; on
the H200 (8B, batch 16, 16K) they and the window gather took ~14 us per layer, each a tiny,
latency-bound kernel (bench/results/profile-8b-b16-fused-qkv-*). Here XLA computes the window
rows with `cache.window_rows` - the very function cache_write uses, whose arithmetic is a fixed
sequence of elementwise adds (`nosa.window_means`), so both paths store the same bits - and one
kernel stores the five rows in place: grid (B, Hk), every cache operand `memory_space=pl.ANY` and
aliased to its output, the layer index read in-kernel, so no layer is sliced out of the stacked
cache. Rows past the allocation (padding) and windows past it are skipped, as the scatters'
mode="drop" does.

`WRITE_IMPL` picks the default: "pallas" ("xla": cache_write). On the H200 (8B, batch 16, 16K;
`bench/profile_decode.py --variant default --variant write=pallas`) the kernel takes 2 us per layer
where the five scatters took ~10, and the step went from 7.50 to 7.30 ms (wall; device busy 7.33 ->
7.22 ms); given the same inputs it stores the same bits as cache_write (GPU test). Session 5 saw
the whole model's decode selections differ from the reference in 10 of 4032 rows with it on, most
likely the structural tie that the decode finish broke along two code paths (mended in session 18,
`selection.decode_block_scores`); since then the GPU selection test passes with either write
(session 19, H200). Because the kernel updates the stacked cache in place, the model's decode step
runs its layers as a straight-line program on the device too (`AttentionSettings.unroll_for`).
Chunks of more than one token (prefill) always take cache_write.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nosa_jax.cache import KVCache, cache_write, window_rows
from nosa_jax.config import NosaConfig

WRITE_IMPL = "pallas"


def _write_kernel(layer_ref, pos_ref, win_ref, k_ref, v_ref, cis_ref, *refs, T: int, n_kt: int, n_cw: int):
    """One (sequence b, kv head h). refs: the new window rows (ktilde [B, Hk, D] if n_kt, cisw
    [B, Hk] if n_cw), then the aliased cache inputs (unused), then the outputs k, v, cis (, ktilde)
    (, cisw) - the same buffers."""
    n_new = (n_kt > 0) + (n_cw > 0)
    rows, outs = refs[:n_new], refs[n_new + 3 + n_new:]
    kc, vc, cc = outs[:3]
    b = pl.program_id(0)
    h = pl.program_id(1)
    layer = layer_ref[0]
    pos = pos_ref[b]
    win = win_ref[b]

    @pl.when(pos < T)
    def _token():
        pltriton.store(kc.at[layer, b, pos, h, :], pltriton.load(k_ref.at[b, h, :]))
        pltriton.store(vc.at[layer, b, pos, h, :], pltriton.load(v_ref.at[b, h, :]))
        pltriton.store(cc.at[layer, b, pl.ds(pos, 1), h], pltriton.load(cis_ref.at[b, pl.ds(h, 1)]))

    if n_kt:
        @pl.when(win < n_kt)
        def _window_key():
            pltriton.store(outs[3].at[layer, b, win, h, :], pltriton.load(rows[0].at[b, h, :]))

    if n_cw:
        @pl.when(win < n_cw)
        def _window_score():
            pltriton.store(outs[-1].at[layer, b, pl.ds(win, 1), h], pltriton.load(rows[-1].at[b, pl.ds(h, 1)]))


def in_place(n_tokens: int, impl: str | None = None) -> bool:
    """Whether `decode_cache_write` stores `n_tokens` new tokens per sequence with the kernel, which
    updates the stacked cache in place (impl "pallas", None: WRITE_IMPL, and one token), rather than
    with cache_write's scatters."""
    impl = WRITE_IMPL if impl is None else impl
    if impl not in ("xla", "pallas"):
        raise ValueError(f"cache write impl must be 'xla' or 'pallas', got {impl!r}")
    return impl == "pallas" and n_tokens == 1


def decode_cache_write(cache: KVCache, layer, start: jax.Array, k: jax.Array, v: jax.Array, cis: jax.Array,
                       n: NosaConfig, *, impl: str | None = None, interpret: bool = False) -> KVCache:
    """`cache_write(cache, layer, start, k, v, cis, n)`, the same cache bit for bit; where
    `in_place(k.shape[1], impl)` the rows are stored by one kernel. interpret: Pallas interpret
    mode (CPU tests)."""
    if not in_place(k.shape[1], impl):
        return cache_write(cache, layer, start, k, v, cis, n)
    B, _, Hk, D = k.shape
    T, n_kt, n_cw = cache.k.shape[2], cache.ktilde.shape[2], cache.cisw.shape[2]
    pos = jnp.asarray(start, jnp.int32)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    win, kt_row, cw_row = window_rows(cache, layer, pos, k, cis, 1, n)
    rows, caches = [], [cache.k, cache.v, cache.cis]
    if n_kt:
        rows.append(kt_row[:, 0])
        caches.append(cache.ktilde)
    if n_cw:
        rows.append(cw_row[:, 0])
        caches.append(cache.cisw)
    args = [jnp.asarray(layer, jnp.int32).reshape(1), pos, win, k[:, 0], v[:, 0], cis[:, 0].astype(jnp.float32),
            *rows, *caches]
    first = len(args) - len(caches)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_write_kernel, T=T, n_kt=n_kt, n_cw=n_cw),
        grid=(B, Hk),
        in_specs=[any_spec] * len(args),
        out_specs=[any_spec] * len(caches),
        out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
        input_output_aliases={first + i: i for i in range(len(caches))},
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="nosa_decode_cache_write",
    )(*args)
    kc, vc, cc = out[:3]
    kt = out[3] if n_kt else cache.ktilde
    cw = out[-1] if n_cw else cache.cisw
    return dataclasses.replace(cache, k=kc, v=vc, cis=cc, ktilde=kt, cisw=cw)
