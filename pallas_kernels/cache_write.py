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

`append_token` is the offloaded cache's decode append in one kernel (`nosa_jax.offload._append`:
the token's key into the ring, its score into the cis history, and the window it completes, whose
means the kernel computes with nosa.window_means' adds, into ktilde / cisw), in place of four XLA
scatters; `APPEND_IMPL` picks it. A first version stored the rows with this module's write kernel
and left the means to XLA: the means became separate fusions (XLA had fused them into the
scatters) and the step was 0.6-1.4 % slower (H100, bench/NOTES.md session 23). This one is the
default since session 24: on an H100 (8B, batch 16, 16K, pool 2x top-k, one process) the step with
it took 0.977 of the scatters' time, and with the scatters 1.014 of its time (paired medians;
bench/NOTES.md session 24 on how those windows ran), and it stores the scatters' bits at the 8B
shape (GPU test).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nosa_jax import nosa
from nosa_jax.cache import KVCache, cache_write, window_rows
from nosa_jax.config import NosaConfig

WRITE_IMPL = "pallas"
# The offloaded cache's decode append (nosa_jax.offload._append): "pallas" (append_token, one kernel
# with the window means) or "xla" (scatters, into which XLA fuses the means).
APPEND_IMPL = "pallas"


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
        v_head = h + v_ref.shape[1] - k_ref.shape[1]  # v's values are its last Hk heads
        pltriton.store(vc.at[layer, b, pos, h, :], pltriton.load(v_ref.at[b, v_head, :]))
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


def _in_place_call(kernel, grid, args, state, name: str, interpret: bool):
    """kernel(*args, *state refs, *output refs) over `grid`, every operand in place in memory (ANY), each
    of `state` aliased to its output (updated in place, not copied); returns the outputs."""
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[any_spec] * (len(args) + len(state)),
        out_specs=[any_spec] * len(state),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state],
        input_output_aliases={len(args) + i: i for i in range(len(state))},
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args, *state)


def decode_cache_write(cache: KVCache, layer, start: jax.Array, k: jax.Array, v: jax.Array, cis: jax.Array,
                       n: NosaConfig, *, impl: str | None = None, interpret: bool = False) -> KVCache:
    """`cache_write(cache, layer, start, k, v[:, :, -Hk:], cis, n)`, the same cache bit for bit; where
    `in_place(k.shape[1], impl)` the rows are stored by one kernel. v: [B, Tc, X >= Hk, D], the
    values in its last Hk heads (the model passes its whole q|k|v projection: the kernel reads them
    there, where a slice would be one more copy per layer). interpret: Pallas interpret mode (CPU
    tests)."""
    B, _, Hk, D = k.shape
    if v.ndim != 4 or v.shape[2] < Hk or v.shape[:2] != k.shape[:2] or v.shape[3] != D:
        raise ValueError(f"v {v.shape} must be [{B}, {k.shape[1]}, >= {Hk}, {D}] (the values in its last {Hk} heads)")
    if not in_place(k.shape[1], impl):
        return cache_write(cache, layer, start, k, v[:, :, v.shape[2] - Hk:], cis, n)
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
            *rows]
    out = _in_place_call(functools.partial(_write_kernel, T=T, n_kt=n_kt, n_cw=n_cw), (B, Hk), args, caches,
                         name="nosa_decode_cache_write", interpret=interpret)
    kc, vc, cc = out[:3]
    kt = out[3] if n_kt else cache.ktilde
    cw = out[-1] if n_cw else cache.cisw
    return dataclasses.replace(cache, k=kc, v=vc, cis=cc, ktilde=kt, cisw=cw)


def _append_kernel(layer_ref, pos_ref, live_ref, k_ref, cis_ref, *refs, n: NosaConfig, n_kt: int, n_cw: int):
    """One (sequence b, kv head h) of `append_token`. refs: the aliased inputs ring, history (,
    ktilde if n_kt) (, cisw if n_cw), then the outputs in the same order - the same buffers. The
    window's rows are read from the inputs (the token's own row is taken from k / cis) and summed
    as nosa.window_means sums them: S consecutive rows per chunk, then the K / S chunks, each a left
    fold of elementwise adds, then / K."""
    n_state = 2 + (n_kt > 0) + (n_cw > 0)
    ins, outs = refs[:n_state], refs[n_state:]
    ring_in, hist_in, ring_ref, hist_ref = ins[0], ins[1], outs[0], outs[1]
    kt_ref = outs[2] if n_kt else None
    cw_ref = outs[-1] if n_cw else None
    b = pl.program_id(0)
    h = pl.program_id(1)
    layer, pos = layer_ref[0], pos_ref[b]
    live = live_ref[b] != 0
    R, T = ring_ref.shape[2], hist_ref.shape[2]
    k_new = pltriton.load(k_ref.at[b, h, :]).astype(jnp.float32)
    c_new = pltriton.load(cis_ref.at[b, pl.ds(h, 1)])
    S, K = n.kernel_stride, n.kernel_size
    c0 = nosa.num_windows(pos, n)  # the window that a token at pos may complete
    win = jnp.where(live & (c0 * S + K - 1 == pos), c0, max(n_kt, n_cw))

    def mean(row):  # row(t) -> the window's t-th row as float32
        total = None
        for j in range(K // S):
            chunk = row(j * S)
            for i in range(1, S):
                chunk = chunk + row(j * S + i)
            total = chunk if total is None else total + chunk
        return total / K

    if n_kt:
        @pl.when(win < n_kt)
        def _window_key():
            def row(t):
                idx = win * S + t
                x = pltriton.load(ring_in.at[layer, b, idx % R, h, :]).astype(jnp.float32)
                return jnp.where(idx == pos, k_new, x)

            pltriton.store(kt_ref.at[layer, b, win, h, :], mean(row).astype(kt_ref.dtype))

    if n_cw:
        @pl.when(win < n_cw)
        def _window_score():
            def row(t):
                idx = win * S + t
                x = pltriton.load(hist_in.at[layer, b, pl.ds(idx, 1), h])
                return jnp.where(idx == pos, c_new, x)

            pltriton.store(cw_ref.at[layer, b, pl.ds(win, 1), h], mean(row))

    @pl.when(live)
    def _token():
        pltriton.store(ring_ref.at[layer, b, pos % R, h, :], pltriton.load(k_ref.at[b, h, :]))

        @pl.when(pos < T)
        def _score():
            pltriton.store(hist_ref.at[layer, b, pl.ds(pos, 1), h], c_new)


def append_token(ring_k, cis_h, ktilde, cisw, layer, pos: jax.Array, live: jax.Array, k: jax.Array, cis: jax.Array,
                 n: NosaConfig, *, interpret: bool = False):
    """The offloaded cache's decode append in one kernel, in place: for each live sequence the
    token's key k [B, Hk, D] into ring_k [L, B, R, Hk, D] at row pos % R, its score cis [B, Hk]
    into the history cis_h [L, B, T, Hk] at row pos (< T), and, where the token completes window
    c0 = num_windows(pos), that window's mean key into ktilde [L, B, C, Hk, D] and mean score into
    cisw [L, B, C', Hk] (C' = 0 outside mode "nosa"), computed in the kernel from the ring and the
    history with the same adds as nosa.window_means (the same bits as the XLA path of
    `nosa_jax.offload._append`). Sequences not `live` write nothing. Returns (ring_k, cis_h, ktilde,
    cisw)."""
    B, Hk, D = k.shape
    if ring_k.shape[2] < n.kernel_size:
        raise ValueError(f"append_token: the ring holds {ring_k.shape[2]} keys, fewer than a window's "
                         f"{n.kernel_size}")
    n_kt, n_cw = ktilde.shape[2], cisw.shape[2]
    state = [ring_k, cis_h] + [ktilde] * (n_kt > 0) + [cisw] * (n_cw > 0)  # no empty array enters the kernel
    args = [jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(pos, jnp.int32), jnp.asarray(live, jnp.int32),
            k.astype(ring_k.dtype), cis.astype(cis_h.dtype)]
    out = _in_place_call(functools.partial(_append_kernel, n=n, n_kt=n_kt, n_cw=n_cw), (B, Hk), args, state,
                         name="nosa_offload_append", interpret=interpret)
    return out[0], out[1], out[2] if n_kt else ktilde, out[-1] if n_cw else cisw
