"""Decode-time NOSA block selection (one query token per sequence) with a Pallas Triton kernel.

Semantics are exactly those of `nosa_jax.nosa` (spec `shared/spec/nosa-upstream.md` 2.4-2.7):

  decode_block_scores = pool_blocks(stage1_scores(q[:, None], ...))[:, :, 0]
  decode_select       = select_blocks(q[:, None], ...)[:, :, 0]

Plan (memory-bound: the compressed keys, C * D * itemsize bytes per (sequence, kv head), are read ONCE;
ktilde is stored in the model dtype, so 2 bytes per element for a bf16 model):

  kernel (grid B x Hk x splits, flash-decoding style): each program walks `tiles_per_program` tiles
    of `block_c` windows of one (sequence, kv head). Per tile it computes the logits of all G query
    heads of the group with one dot k [block_c, D] x q^T [D, G_pad >= 16] (zero columns past G),
    writes the raw logits (G columns only: G * 4 bytes per window against D * itemsize read) and
    keeps a running max / sum-of-exp per head (online softmax statistics). Windows >= n_win[b] are
    never loaded; `layer` is read inside the kernel, so no layer of the stacked pool is ever copied.
    The dot follows nosa.stage1_dot_dtype: bf16 (or fp16) q and ktilde -> ONE 16-bit tensor-core
    pass with float32 accumulation (the products are exact in float32, as in the jnp reference);
    float32 ktilde -> float32-accurate, three TF32 tensor-core products by default (see
    _dot_precision). The next tile's load is issued before the current tile's math (`prefetch`).
  finish (jnp fused by XLA, or a second small Pallas kernel): combine the per-split statistics,
    normalise the logits, sum over the G heads, max-pool windows to blocks, force sink/local blocks.
  selection: the two-stage top-k, with ties broken lowest-index-first explicitly. topk_impl "xla"
    (jnp: `nosa.two_stage_select`, three XLA sorts) or "pallas" (`pallas_kernels.topk`: one fused
    kernel, radix select + scatter, no sort); the default is the module constant TOPK_IMPL.

Measured on the H200 (jax 0.11.2; B=16, Hq=32, Hk=2, D=128, FLOAT32 ktilde, 3-pass TF32 dot;
bench/kernels_selection.py), before ktilde moved to the model dtype:
  128K context: block scores 87.7 us (1.53 TB/s on the key bytes; jnp reference 186 us),
                decode_select 160 us (reference 253 us; ~70 us of it is XLA's two top-k passes).
  32K context:  block scores 32.3 us (reference 89 us), decode_select 72 us (reference 108 us).
  A Pallas kernel that only reads the same keys runs at ~3.0 TB/s (44 us at 128K); one TF32 pass
  (not selection-exact) 54 us; the 3-product float32-accurate dot costs the rest.
  bf16 ktilde (the model's case: half the bytes, one MMA pass; kernels_selection-s4-2026-11-28):
  block scores 49.6 us at 128K (1.35 TB/s), 21.6 us at 32K; decode_select with the Pallas top-k
  85.6 us at 128K, 34.7 us at 32K.

`interpret=True` runs the same kernel on CPU (Pallas interpret mode); on GPU it lowers through
Triton (`pallas_call` with `triton.CompilerParams`). Shapes the kernel loads are powers of two
(block_c, G_pad, D) and the dot has every dimension >= 16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nosa_jax import nosa
from nosa_jax.config import NosaConfig
from pallas_kernels.lanes import next_pow2
from pallas_kernels.topk import decode_two_stage_select, two_stage_select_pallas

NEG_INF = float("-inf")
POS_INF = float("inf")

# Programs the heuristic aims for when it picks how many tiles each program walks (H200: 132 SMs).
_TARGET_PROGRAMS = 512

# Default two-stage top-k of select_from_scores / decode_select when the caller passes no topk_impl:
# "xla" (nosa.two_stage_select: three XLA sorts) or "pallas" (pallas_kernels.topk.two_stage_select_pallas,
# the same ids bit for bit). H200, B=16, Hk=2, bf16 ktilde (bench/results/kernels_selection-s4-2026-11-28):
# decode_select 34.7 us with the Pallas top-k vs 63.3 us with XLA's at 32K, 85.6 vs 133.0 us at 128K
# (rows of 2049 blocks, padded to 4096 lanes: topk.default_tiling keeps the compare tensor in registers;
# the first, fixed-tiling measurement spilled and lost, 181.8 vs 150.8 us).
TOPK_IMPL = "pallas"

# Default finish of decode_block_scores (normalise, sum over the group, pool) when the caller passes
# none: "pallas" (one small kernel) or "jnp" (XLA fusions). Alone the two measured alike, and inside
# the 8B decode step (batch 16, 16K) too: 7.327 vs 7.334 ms device time per step
# (bench/results/profile-8b-b16-s5-variants-*; `bench/profile_decode.py --variant finish=pallas`);
# in the offloaded step the Pallas kernel lost 0.4 ms of wall time with the layers in a scan
# (session 17) and stayed within the spread unrolled (session 21: 8.58 ms against 8.28 / 8.63);
# decode_select at batch 16: 34.3 vs 35.5 us at 32K, 74.3 vs 74.7 at 128K (H100, session 22). Once
# the top-k pooled its own inputs (session 23) the kernel replaces all of the selection's XLA
# fusions left, and it became the default in session 24: in one process on an H100 (8B offloaded,
# 16K, batch 16, pool 2x top-k) the jnp finish took 1.009x as long, and 0.980x the other way round
# (bench/NOTES.md session 24); the whole-model GPU selection test passes with it. A third finish
# inside the top-k's kernel (one program per row from the logits to the ids) lost and was removed in
# session 22 (48.8 / 155.3 us there; bench/NOTES.md).
SCORES_FINISH = "pallas"

# Where decode_select's Pallas top-k gets its inputs pooled and forced: "kernel" (in the top-k's own
# kernel: the cis window row of mode "nosa" is read from the stacked pool and max-pooled there, and
# both rows get the sink / local forcing there; topk.decode_two_stage_select) or "xla" (the jnp
# _pool_windows and forcing, as XLA fusions before the kernel). The XLA top-k always takes "xla".
TOPK_POOL = "kernel"


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0



def _dot_precision(precision, interpret: bool, dot_dtype=jnp.float32):
    """Precision of the logits dot (all float32-accurate except "tf32").

    dot_dtype (nosa.stage1_dot_dtype of q and ktilde) bf16 / fp16 -> "native": one 16-bit
    tensor-core pass with float32 accumulation (products exact, the reference's own arithmetic);
    `precision` must then be None or "native". For float32 operands:

    None / "tf32x3" -> DotAlgorithmPreset.TF32_TF32_F32_X3: three TF32 tensor-core products
                       (~1e-6 relative). The GPU default: measured fastest accurate option on H200.
    "split3"        -> the same three products with the operands split explicitly in the kernel.
    "bf16x6"/"bf16x9" -> six / nine bf16 tensor-core products.
    "ieee"          -> lax.Precision.HIGHEST (Triton input_precision=ieee, FMA units: 10x slower).
    "tf32"          -> one TF32 pass: ~1e-3 relative, NOT selection-exact (roofline experiments only).
    Interpret mode uses HIGHEST for all but "split3" (the CPU backend lacks the TF32 presets).
    """
    if jnp.dtype(dot_dtype) != jnp.float32:
        if precision not in (None, "native"):
            raise ValueError(f"{jnp.dtype(dot_dtype).name} q/ktilde use one native 16-bit pass (exact products); "
                             f"precision must be None or 'native', got {precision!r}")
        return "native"
    if precision == "native":
        raise ValueError("precision 'native' needs bf16 / fp16 q and ktilde of one dtype; "
                         "float32 operands take a float32-accurate precision")
    if precision == "split3":  # plain jnp ops: also runs (exactly) in interpret mode
        return "split3"
    if precision is None and not interpret:
        precision = "tf32x3"
    if interpret or precision in (None, "ieee", "highest"):
        return lax.Precision.HIGHEST
    if precision == "tf32x3":
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    if precision == "bf16x6":
        return lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    if precision == "bf16x9":
        return lax.DotAlgorithmPreset.BF16_BF16_F32_X9
    if precision == "tf32":
        return lax.Precision.DEFAULT
    raise ValueError("precision must be one of None, 'tf32x3', 'split3', 'bf16x6', 'bf16x9', 'ieee', 'tf32'; "
                     f"got {precision!r}")


def _check_tiling(D: int, block_c: int) -> None:
    """The Triton dot's shape rules for the stage-1 kernels (decode and prefill)."""
    if not (_is_pow2(D) and D >= 16):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton dot, got {D}")
    if not (_is_pow2(block_c) and block_c >= 16):
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c}")


def _effective_windows(n_win, q_pos, C: int, cfg: NosaConfig):
    """Windows visible to the decode query: c < n_win, S c + K - 1 <= q_pos and c < C. [B] int32."""
    n_vis = nosa.num_windows(q_pos.astype(jnp.int32) + 1, cfg)
    return jnp.clip(jnp.minimum(n_win.astype(jnp.int32), n_vis), 0, C).astype(jnp.int32)


# ----------------------------------------------------------------------------- the kernel

def _tf32_hi(x):
    """x truncated to its top 10 mantissa bits: exactly representable in TF32."""
    bits = lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-8192)  # 0xFFFFE000
    return lax.bitcast_convert_type(bits, jnp.float32)


def _dot(a, b, precision):
    """a [M, K] @ b [K, N] accumulated in float32. precision "native": a and b in their own 16-bit
    dtype, one tensor-core pass (exact products). "split3": three TF32 tensor-core products of
    explicitly split float32 operands (a_hi b_hi + a_lo b_hi + a_hi b_lo; relative error ~2^-20)."""
    dims = (((1,), (0,)), ((), ()))
    if isinstance(precision, str) and precision == "native":
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if isinstance(precision, str) and precision == "split3":
        a_hi = _tf32_hi(a)
        a_lo = a - a_hi
        b_hi = _tf32_hi(b)
        b_lo = b - b_hi
        tf32 = lax.Precision.DEFAULT
        out = lax.dot_general(a_lo, b_hi, dims, precision=tf32, preferred_element_type=jnp.float32)
        out = out + lax.dot_general(a_hi, b_lo, dims, precision=tf32, preferred_element_type=jnp.float32)
        return out + lax.dot_general(a_hi, b_hi, dims, precision=tf32, preferred_element_type=jnp.float32)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits_kernel(layer_ref, nwin_ref, q_ref, k_ref, s_ref, m_ref, l_ref, *, G: int, block_c: int,
                   tiles_per_program: int, sqrt_d: float, precision, prefetch: bool):
    """One (sequence b, kv head h, split sp) program.

    layer_ref [1] i32; nwin_ref [B] i32; q_ref [G_pad, D] (this b, h; zero rows >= G) in the dot
    dtype (bf16 / fp16 with precision "native", else f32); k_ref [L, C, D] (this b, h; ktilde's
    dtype); s_ref [1 + C_pad, G_pad] f32 logits out of this (b, h), window-major, window c at
    row 1 + c (row 0 stands for window -1, so the pooling's shifted read never starts below 0); m_ref, l_ref [G_pad] softmax statistics of this split.
    The dot is k [block_c, D] x q^T [D, G_pad]: the keys are the M (row) operand, read K-major
    straight from memory, so Hopper can use wgmma with block_c >= 64.
    prefetch: issue the load of tile t + 1 before the math of tile t (register double buffering).
    Triton only software-pipelines loads that feed a dot directly; the 3-product precisions put
    elementwise splits between the load and the dots, so without this each tile's load latency is
    exposed. With "native" the loaded 16-bit tile feeds the dot directly.
    """
    b = pl.program_id(0)
    sp = pl.program_id(2)
    g_pad, d = q_ref.shape
    layer = layer_ref[0]
    n = nwin_ref[b]
    split_start = sp * (tiles_per_program * block_c)
    # Tiles of this split that hold at least one valid window; the rest is never touched.
    n_tiles = jnp.clip((n - split_start + block_c - 1) // block_c, 0, tiles_per_program)

    qt = q_ref[...].T  # [D, G_pad], transposed in registers once per program (not by an XLA transpose per call)
    col_ok = lax.broadcasted_iota(jnp.int32, (block_c, g_pad), 1) < G
    row = lax.broadcasted_iota(jnp.int32, (block_c, 1), 0)
    krow = lax.broadcasted_iota(jnp.int32, (block_c, d), 0)

    def load_tile(t):
        c0 = split_start + t * block_c
        ok = ((c0 + krow) < n) & (t < n_tiles)  # never touch windows past n or past this split
        return pltriton.load(k_ref.at[layer, pl.ds(c0, block_c), :], mask=ok, other=0.0)

    def step(t, k, m, l):
        c0 = split_start + t * block_c
        s = _dot(k, qt, precision)
        s = s / sqrt_d
        s = jnp.where((c0 + row) < n, s, NEG_INF)  # [block_c, G_pad]
        pltriton.store(s_ref.at[pl.ds(1 + c0, block_c), :], s, mask=col_ok)
        m_new = jnp.maximum(m, jnp.max(s, axis=0))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        l = l * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(s - m_safe[None, :]), axis=0)
        return m_new, l

    m0 = jnp.full((g_pad,), NEG_INF, jnp.float32)
    l0 = jnp.zeros((g_pad,), jnp.float32)
    if prefetch:
        def body(t, carry):
            m, l, k = carry
            k_next = load_tile(t + 1)
            m, l = step(t, k, m, l)
            return m, l, k_next

        m, l, _ = lax.fori_loop(0, n_tiles, body, (m0, l0, load_tile(0)))
    else:
        m, l = lax.fori_loop(0, n_tiles, lambda t, c: step(t, load_tile(t), *c), (m0, l0))
    m_ref[...] = m
    l_ref[...] = l


def _combine_splits(m, l):
    """In-kernel: the per-head softmax max M and sum Z over all splits from the splits' statistics
    m, l [S, G_pad] (splits past the windows: m -inf, l 0). M is 0 where no window is valid, Z 1 where
    the sum is 0 (as _window_scores does in jnp)."""
    M = jnp.max(m, axis=0)
    M = jnp.where(M == NEG_INF, 0.0, M)
    Z = jnp.sum(l * jnp.exp(m - M[None, :]), axis=0)
    return M, jnp.where(Z > 0, Z, 1.0)


def _finish_kernel(nwin_ref, m_ref, l_ref, s_ref, o_ref, *, G: int, P: int, blocks_per_program: int):
    """Normalise, sum over the group and max-pool one tile of blocks of one (b, h).

    nwin_ref [B]; m_ref, l_ref [S, G_pad] split statistics (S a power of two, `_plan`);
    s_ref [1 + C_pad, G_pad] logits (window c at row 1 + c); o_ref [blocks_per_program] pooled scores (no forcing).
    Block j = max over windows P j - 1 .. P j + P - 1 = max(max S[P j .. P j + P - 1],
    max S[P j - 1 .. P j + P - 2]): two window tiles, the second shifted back by one.
    """
    b = pl.program_id(0)
    tile = pl.program_id(2)
    g_pad = m_ref.shape[1]
    n = nwin_ref[b]
    M, Z = _combine_splits(pltriton.load(m_ref), pltriton.load(l_ref))
    nw = blocks_per_program * P
    w0 = tile * nw
    row = lax.broadcasted_iota(jnp.int32, (nw, g_pad), 0)
    col_ok = lax.broadcasted_iota(jnp.int32, (nw, g_pad), 1) < G

    def window_scores(start):
        w = start + row
        ok = (w >= 0) & (w < n)
        x = pltriton.load(s_ref.at[pl.ds(start + 1, nw), :], mask=ok & col_ok, other=0.0)
        p = jnp.where(col_ok, jnp.exp(x - M[None, :]) / Z[None, :], 0.0)
        S = jnp.sum(p, axis=1)  # [nw]
        w1 = start + lax.broadcasted_iota(jnp.int32, (nw,), 0)
        return jnp.where((w1 >= 0) & (w1 < n), S, NEG_INF)

    a = jnp.max(window_scores(w0).reshape(blocks_per_program, P), axis=1)
    c = jnp.max(window_scores(w0 - 1).reshape(blocks_per_program, P), axis=1)
    o_ref[...] = jnp.maximum(a, c)


def _plan(C: int, B: int, Hk: int, block_c: int, tiles_per_program: int | None) -> tuple[int, int]:
    """(tiles per program, splits). The splits are rounded up to a power of two: the finish loads the
    split statistics as one [S, G_pad] tile, and splits past the windows cost a program that writes
    m = -inf, l = 0 and touches no key, where padding the statistics to a power of two took two XLA
    pads per layer (~1.2 us each on the H200 at 16K, batch 16: 17 splits of 1026 windows)."""
    n_tiles = max(1, -(-C // block_c))
    if tiles_per_program is None:
        tiles_per_program = max(1, min(n_tiles, round(B * Hk * n_tiles / _TARGET_PROGRAMS)))
    tiles_per_program = max(1, min(int(tiles_per_program), n_tiles))
    n_splits = next_pow2(-(-n_tiles // tiles_per_program))
    return tiles_per_program, n_splits


def window_logits(q, ktilde_pool, n_eff, layer, *, interpret: bool = False, block_c: int = 64,
                  tiles_per_program: int | None = None, num_warps: int = 4, num_stages: int = 3,
                  precision=None, prefetch: bool = True):
    """Raw stage-1 logits and per-split softmax statistics for one decode query per sequence.

    q [B, Hq, D]; ktilde_pool [L, B, C, Hk, D] (the model dtype: bf16 q and ktilde take one native
    bf16 dot pass, float32 ones a float32-accurate `precision`, see _dot_precision); n_eff [B]
    valid windows (clipped to C); layer: int scalar (traced ok). Returns logits [B, Hk, 1 + C_pad, G_pad] (window c at row 1 + c; row 0,
    columns >= G and windows >= n_eff hold garbage), m, l [B, Hk, splits, G_pad] (max / sum of exp over each split's valid windows).
    """
    B, Hq, D = q.shape
    L, B2, C, Hk, D2 = ktilde_pool.shape
    if B2 != B or D2 != D or Hq % Hk:
        raise ValueError(f"shape mismatch: q {q.shape}, ktilde_pool {ktilde_pool.shape}")
    _check_tiling(D, block_c)
    G = Hq // Hk
    g_pad = max(16, next_pow2(G))
    tpp, n_splits = _plan(C, B, Hk, block_c, tiles_per_program)
    split_len = tpp * block_c
    c_pad = n_splits * split_len

    dot_dtype = nosa.stage1_dot_dtype(q.dtype, ktilde_pool.dtype)
    prec = _dot_precision(precision, interpret, dot_dtype)
    qg = q.astype(dot_dtype).reshape(B, Hk, G, D)  # the group's rows: a reshape, no copy
    if g_pad != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, g_pad - G), (0, 0)))
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    kernel = functools.partial(_logits_kernel, G=G, block_c=block_c, tiles_per_program=tpp,
                               sqrt_d=float(math.sqrt(D)), precision=prec,
                               prefetch=prefetch)
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (0,)),
        pl.BlockSpec((B,), lambda b, h, s: (0,)),
        pl.BlockSpec((None, None, g_pad, D), lambda b, h, s: (b, h, 0, 0)),
        # The whole pool of one (b, h): a pointer, nothing is copied; the layer is picked inside.
        pl.BlockSpec((L, None, C, None, D), lambda b, h, s: (0, b, 0, h, 0)),
    ]
    out_specs = [
        # All splits of one (b, h) write disjoint rows of one block (offset by the row of window -1).
        pl.BlockSpec((None, None, 1 + c_pad, g_pad), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((None, None, None, g_pad), lambda b, h, s: (b, h, s, 0)),
        pl.BlockSpec((None, None, None, g_pad), lambda b, h, s: (b, h, s, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, Hk, 1 + c_pad, g_pad), jnp.float32),
        jax.ShapeDtypeStruct((B, Hk, n_splits, g_pad), jnp.float32),
        jax.ShapeDtypeStruct((B, Hk, n_splits, g_pad), jnp.float32),
    ]
    compiler_params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    logits, m, l = pl.pallas_call(
        kernel, grid=(B, Hk, n_splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params, name="nosa_decode_stage1_logits",
    )(layer_arr, n_eff.astype(jnp.int32), qg, ktilde_pool)
    return logits, m, l


def pooled_window_scores(logits, m, l, n_eff, *, G: int, n_blocks: int, P: int, interpret: bool = False,
                         blocks_per_program: int = 64, num_warps: int = 4):
    """Pallas finish: [B, Hk, n_blocks] pooled stage-1 scores (no sink/local forcing) from the
    kernel's logits and split statistics. P (windows per block step) must be a power of two."""
    B, Hk, rows, g_pad = logits.shape
    n_splits = m.shape[2]
    if not _is_pow2(n_splits):
        raise ValueError(f"pooled_window_scores: {n_splits} splits; window_logits gives a power of two")
    bpp = max(1, min(blocks_per_program, next_pow2(n_blocks)))
    n_tiles = -(-n_blocks // bpp)
    kernel = functools.partial(_finish_kernel, G=G, P=P, blocks_per_program=bpp)
    out = pl.pallas_call(
        kernel, grid=(B, Hk, n_tiles),
        in_specs=[
            pl.BlockSpec((B,), lambda b, h, t: (0,)),
            pl.BlockSpec((None, None, n_splits, g_pad), lambda b, h, t: (b, h, 0, 0)),
            pl.BlockSpec((None, None, n_splits, g_pad), lambda b, h, t: (b, h, 0, 0)),
            pl.BlockSpec((None, None, rows, g_pad), lambda b, h, t: (b, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bpp), lambda b, h, t: (b, h, t)),
        out_shape=jax.ShapeDtypeStruct((B, Hk, n_tiles * bpp), jnp.float32),
        interpret=interpret, name="nosa_decode_stage1_pool",
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    )(n_eff.astype(jnp.int32), m, l, logits)
    return out[:, :, :n_blocks]


# ----------------------------------------------------------------------------- jnp finishing

def _forced(q_pos, n_blocks: int, cfg: NosaConfig):
    """Forced blocks for queries at q_pos [B] (decode) or [B, Tc] (prefill): [B, 1, (Tc,) n_blocks]."""
    qb = jnp.expand_dims(q_pos // cfg.block_size, 1)[..., None]
    return nosa.forced(jnp.arange(n_blocks), qb, cfg)


def _pool_windows(x, q_pos, n_blocks: int, cfg: NosaConfig, force: bool = True):
    """[B, Hk, (Tc,) W] window scores (-inf where invalid) -> [B, Hk, (Tc,) n_blocks] pooled, with
    forcing for the queries at q_pos [B, (Tc)] unless `force` is False.

    Block j = max over windows P j - 1 .. P j + P - 1 (as nosa.pool_blocks), computed as the max of
    the P windows of group j and the last window of group j - 1: one elementwise pass over x.
    """
    P = cfg.pool_stride
    lead, W = x.shape[:-1], x.shape[-1]
    need = n_blocks * P
    if W >= need:
        x = x[..., :need]
    else:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, need - W)], constant_values=NEG_INF)
    g = x.reshape(lead + (n_blocks, P))
    grp = jnp.max(g, axis=-1)
    prev = jnp.concatenate([jnp.full(lead + (1,), NEG_INF, x.dtype), g[..., :-1, P - 1]], axis=-1)
    pooled = jnp.maximum(grp, prev)
    return jnp.where(_forced(q_pos, n_blocks, cfg), POS_INF, pooled) if force else pooled


def _window_scores(logits, m, l, n_eff, G: int, n_windows: int):
    """Normalise the logits with the combined statistics and sum over the group: [B, Hk, W]."""
    M = jnp.max(m, axis=2)  # [B, Hk, G_pad]
    M = jnp.where(jnp.isfinite(M), M, 0.0)
    Z = jnp.sum(l * jnp.exp(m - M[:, :, None]), axis=2)
    Z = jnp.where(Z > 0, Z, 1.0)
    W = min(logits.shape[2] - 1, n_windows)
    x = logits[:, :, 1:W + 1, :G]
    p = jnp.exp(x - M[:, :, None, :G]) / Z[:, :, None, :G]
    S = jnp.sum(p, axis=-1)
    valid = jnp.arange(W)[None, None, :] < n_eff[:, None, None]
    return jnp.where(valid, S, NEG_INF)


def decode_block_scores(q, ktilde_pool, n_win, q_pos, layer, *, nosa_cfg: NosaConfig, n_blocks: int,
                        interpret: bool = False, block_c: int = 64, tiles_per_program: int | None = None,
                        num_warps: int = 4, num_stages: int = 3, precision=None,
                        prefetch: bool = True, finish: str | None = None, force: bool = True) -> jax.Array:
    """Pooled stage-1 block scores of one decode query per sequence. [B, Hk, n_blocks] float32.

    q [B, Hq, D]; ktilde_pool [L, B, C, Hk, D] (all layers, model dtype; `layer` selects one inside
    the kernel);
    n_win [B] valid windows; q_pos [B] query positions (kv_len - 1). Equal to
    nosa.pool_blocks(nosa.stage1_scores(q[:, None], q_pos[:, None], ktilde_pool[layer], n_win)).
    finish: "jnp" (XLA fusions) or "pallas" (a second small kernel: normalise, sum over G, pool);
    None takes the module default SCORES_FINISH. "pallas" needs block_size / kernel_stride to be a
    power of two, else "jnp" is used. force False: without the sink / local forcing (for a top-k
    that forces them itself).
    """
    finish = SCORES_FINISH if finish is None else finish
    cfg = nosa_cfg
    B, Hq, D = q.shape
    C, Hk = ktilde_pool.shape[2], ktilde_pool.shape[3]
    G = Hq // Hk
    q_pos = jnp.asarray(q_pos, jnp.int32)
    if C == 0:
        return _pool_windows(jnp.full((B, Hk, 0), NEG_INF, jnp.float32), q_pos, n_blocks, cfg, force)
    n_eff = _effective_windows(jnp.asarray(n_win), q_pos, C, cfg)
    logits, m, l = window_logits(q, ktilde_pool, n_eff, layer, interpret=interpret, block_c=block_c,
                                 tiles_per_program=tiles_per_program, num_warps=num_warps,
                                 num_stages=num_stages, precision=precision, prefetch=prefetch)
    if finish == "pallas" and _is_pow2(cfg.pool_stride):
        pooled = pooled_window_scores(logits, m, l, n_eff, G=G, n_blocks=n_blocks, P=cfg.pool_stride,
                                      interpret=interpret)
        return jnp.where(_forced(q_pos, n_blocks, cfg), POS_INF, pooled) if force else pooled
    if finish not in ("pallas", "jnp"):
        raise ValueError(f"finish must be 'jnp' or 'pallas', got {finish!r}")
    S = _window_scores(logits, m, l, n_eff, G, n_blocks * cfg.pool_stride)
    # One stored copy of the window scores. A window shared by two blocks must give both blocks the
    # same bits: that exact tie is structural and upstream breaks it lowest-index-first. Fused, XLA
    # may compute a window's score once per use, on two code paths here (the group's max and the
    # previous group's last window), whose last bits can differ and flip the tie. Suspected cause of
    # the GPU selection test's failure in session 18 (bench/NOTES.md; not yet run on a GPU).
    S = lax.optimization_barrier(S)
    return _pool_windows(S, q_pos, n_blocks, cfg, force)


def decode_block_scores_reference(q, ktilde_pool, n_win, q_pos, layer, *, nosa_cfg: NosaConfig,
                                  n_blocks: int) -> jax.Array:
    """The jnp reference: nosa.stage1_scores + nosa.pool_blocks with Tq = 1. [B, Hk, n_blocks]."""
    q_pos = jnp.asarray(q_pos, jnp.int32)[:, None]
    kt = lax.dynamic_index_in_dim(ktilde_pool, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
    s1 = nosa.stage1_scores(q[:, None], q_pos, kt, jnp.asarray(n_win, jnp.int32), nosa_cfg)
    return nosa.pool_blocks(s1, q_pos, jnp.asarray(n_win, jnp.int32), n_blocks, nosa_cfg)[:, :, 0]


def select_from_scores(b_qk, cisw_layer, n_eff, q_pos, *, nosa_cfg: NosaConfig, n_blocks: int,
                       mode: str, topk_impl: str | None = None, interpret: bool = False) -> jax.Array:
    """Two-stage top-k (spec 2.7) from pooled query-aware scores b_qk [B, Hk, n_blocks].

    cisw_layer [B, C, Hk] (mode "nosa"; ignored for "infllmv2"). Returns [B, Hk, K] int32:
    ascending ids then -1, ties broken lowest-index-first on every backend.
    topk_impl: "xla" (nosa.two_stage_select) or "pallas" (the fused kernel of pallas_kernels.topk,
    identical ids); None takes the module default TOPK_IMPL. interpret: the Pallas kernel's
    interpret mode (CPU).
    """
    impl = TOPK_IMPL if topk_impl is None else topk_impl
    if impl not in ("xla", "pallas"):
        raise ValueError(f"topk_impl must be 'xla' or 'pallas', got {topk_impl!r}")
    cfg = nosa_cfg
    qb = (q_pos // cfg.block_size)[:, None, None]
    b_cis = None
    if mode == "nosa":
        C = cisw_layer.shape[1]
        cw = jnp.moveaxis(cisw_layer.astype(jnp.float32), 2, 1)  # [B, Hk, C]
        cw = jnp.where(jnp.arange(C)[None, None, :] < n_eff[:, None, None], cw, NEG_INF)
        b_cis = _pool_windows(cw, q_pos, n_blocks, cfg)
    if impl == "pallas":
        return two_stage_select_pallas(b_qk, b_cis, qb, cfg, mode, interpret=interpret)
    return nosa.two_stage_select(b_qk, b_cis, qb, cfg, mode)


def decode_select(q, ktilde_pool, cisw_pool, n_win, kv_len, layer, *, nosa_cfg: NosaConfig,
                  n_blocks: int, mode: str, interpret: bool = False, topk_impl: str | None = None,
                  finish: str | None = None, **kernel_kw) -> jax.Array:
    """Block ids of one decode query per sequence: [B, Hk, K] int32, K = min(topk, n_blocks).

    Same contract as nosa.select_blocks(q[:, None], (kv_len - 1)[:, None], ktilde_pool[layer],
    cisw_pool[layer], kv_len, n_blocks, cfg, mode)[:, :, 0]: ascending ids, then -1.
    cisw_pool [L, B, C, Hk] (may be None for mode "infllmv2"). `kernel_kw` go to the kernel
    (block_c, tiles_per_program, num_warps, num_stages, precision, prefetch). finish: that of
    decode_block_scores (None: SCORES_FINISH). topk_impl: the two-stage top-k, "xla" or "pallas"
    (None: the module default TOPK_IMPL); see select_from_scores. The Pallas top-k pools and forces
    its inputs in its own kernel where TOPK_POOL is "kernel" (and the pool has windows).
    """
    cfg = nosa_cfg
    kv_len = jnp.asarray(kv_len, jnp.int32)
    q_pos = kv_len - 1
    C = ktilde_pool.shape[2]
    n_eff = _effective_windows(jnp.asarray(n_win), q_pos, C, cfg)
    impl = TOPK_IMPL if topk_impl is None else topk_impl
    if TOPK_POOL not in ("kernel", "xla"):
        raise ValueError(f"selection.TOPK_POOL must be 'kernel' or 'xla', got {TOPK_POOL!r}")
    in_kernel = impl == "pallas" and TOPK_POOL == "kernel" and C > 0
    b_qk = decode_block_scores(q, ktilde_pool, n_eff, q_pos, layer, nosa_cfg=cfg, n_blocks=n_blocks,
                               interpret=interpret, finish=finish, force=not in_kernel, **kernel_kw)
    if in_kernel:
        return decode_two_stage_select(b_qk, cisw_pool if mode == "nosa" else None, layer, n_eff,
                                       q_pos // cfg.block_size, cfg, mode, interpret=interpret)
    cisw_layer = None
    if mode == "nosa":
        # Only [B, C, Hk] (1/D of the keys' bytes); XLA fuses this slice into its consumer.
        cisw_layer = lax.dynamic_index_in_dim(cisw_pool, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
    return select_from_scores(b_qk, cisw_layer, n_eff, q_pos, nosa_cfg=cfg, n_blocks=n_blocks, mode=mode,
                              topk_impl=topk_impl, interpret=interpret)


def decode_select_reference(q, ktilde_pool, cisw_pool, n_win, kv_len, layer, *, nosa_cfg: NosaConfig,
                            n_blocks: int, mode: str) -> jax.Array:
    """nosa.select_blocks for the same decode query (reads one layer of the pools). [B, Hk, K]."""
    kv_len = jnp.asarray(kv_len, jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    kt = lax.dynamic_index_in_dim(ktilde_pool, layer, 0, keepdims=False)
    cw = None if cisw_pool is None else lax.dynamic_index_in_dim(cisw_pool, layer, 0, keepdims=False)
    del n_win  # select_blocks derives it from kv_len
    return nosa.select_blocks(q[:, None], (kv_len - 1)[:, None], kt, cw, kv_len, n_blocks, nosa_cfg,
                              mode)[:, :, 0]
