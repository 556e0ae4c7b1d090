"""Decode-time NOSA block selection (one query token per sequence) with a Pallas Triton kernel.

Semantics are exactly those of `nosa_jax.nosa` (spec `shared/spec/nosa-upstream.md` 2.4-2.7):

  decode_block_scores = pool_blocks(stage1_scores(q[:, None], ...))[:, :, 0]
  decode_select       = select_blocks(q[:, None], ...)[:, :, 0]

Plan (memory-bound: the compressed keys, C * D * 4 bytes per (sequence, kv head), are read ONCE):

  kernel (grid B x Hk x splits, flash-decoding style): each program walks `tiles_per_program` tiles
    of `block_c` windows of one (sequence, kv head). Per tile it computes the logits of all G query
    heads of the group with one dot [G_pad >= 16, D] x [D, block_c] (G padded with zero rows), writes
    the raw logits (G rows only; G * 4 bytes per window against D * 4 read) and keeps a running
    max / sum-of-exp per head (online softmax statistics). Windows >= n_win[b] are never loaded;
    `layer` is read inside the kernel, so no layer of the stacked pool is ever copied.
  finish (jnp, fused by XLA): combine the per-split statistics, normalise the logits, sum over the
    G heads of the group, max-pool windows to blocks, force sink/local blocks to +inf.

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

NEG_INF = float("-inf")
POS_INF = float("inf")

# Programs the heuristic aims for when it picks how many tiles each program walks (H200: 132 SMs).
_TARGET_PROGRAMS = 512


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot_precision(precision, interpret: bool):
    """Precision of the logits dot. Default: exact float32 (IEEE FMA on GPU).

    "ieee" / None -> lax.Precision.HIGHEST (Triton input_precision=ieee);
    "tf32x3"      -> DotAlgorithmPreset.TF32_TF32_F32_X3 (tensor cores, ~fp32 accuracy), GPU only;
    "tf32"        -> lax.Precision.DEFAULT (single TF32 pass: ~1e-3 relative; NOT selection-exact).
    Interpret mode always uses HIGHEST (the CPU backend lacks the TF32 presets).
    """
    if interpret or precision in (None, "ieee", "highest"):
        return lax.Precision.HIGHEST
    if precision == "tf32x3":
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    if precision == "tf32":
        return lax.Precision.DEFAULT
    raise ValueError(f"precision must be one of None, 'ieee', 'tf32x3', 'tf32'; got {precision!r}")


def _effective_windows(n_win, q_pos, C: int, cfg: NosaConfig):
    """Windows visible to the decode query: c < n_win, S c + K - 1 <= q_pos and c < C. [B] int32."""
    n_vis = nosa.num_windows(q_pos.astype(jnp.int32) + 1, cfg)
    return jnp.clip(jnp.minimum(n_win.astype(jnp.int32), n_vis), 0, C).astype(jnp.int32)


# ----------------------------------------------------------------------------- the kernel

def _logits_kernel(layer_ref, nwin_ref, q_ref, k_ref, s_ref, m_ref, l_ref, *, G: int, block_c: int,
                   tiles_per_program: int, sqrt_d: float, precision):
    """One (sequence b, kv head h, split sp) program.

    layer_ref [1] i32; nwin_ref [B] i32; q_ref [G_pad, D] f32; k_ref [L, C, D] (this b, h);
    s_ref [G_pad, split_len] logits out; m_ref, l_ref [G_pad] softmax statistics of this split.
    """
    b = pl.program_id(0)
    sp = pl.program_id(2)
    g_pad, d = q_ref.shape
    layer = layer_ref[0]
    n = nwin_ref[b]
    split_start = sp * (tiles_per_program * block_c)
    # Tiles of this split that hold at least one valid window; the rest is never touched.
    n_tiles = jnp.clip((n - split_start + block_c - 1) // block_c, 0, tiles_per_program)

    q = q_ref[...].astype(jnp.float32)
    row_ok = lax.broadcasted_iota(jnp.int32, (g_pad, block_c), 0) < G
    col = lax.broadcasted_iota(jnp.int32, (1, block_c), 1)
    kcol = lax.broadcasted_iota(jnp.int32, (block_c, d), 0)

    def body(t, carry):
        m, l = carry
        local = t * block_c
        c0 = split_start + local
        k = pltriton.load(k_ref.at[layer, pl.ds(c0, block_c), :], mask=(c0 + kcol) < n, other=0.0)
        s = lax.dot_general(q, k.astype(jnp.float32), (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        s = s / sqrt_d
        s = jnp.where((c0 + col) < n, s, NEG_INF)  # [G_pad, block_c]
        pltriton.store(s_ref.at[:, pl.ds(local, block_c)], s, mask=row_ok)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        l = l * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(s - m_safe[:, None]), axis=1)
        return m_new, l

    m0 = jnp.full((g_pad,), NEG_INF, jnp.float32)
    l0 = jnp.zeros((g_pad,), jnp.float32)
    m, l = lax.fori_loop(0, n_tiles, body, (m0, l0))
    m_ref[...] = m
    l_ref[...] = l


def _plan(C: int, B: int, Hk: int, block_c: int, tiles_per_program: int | None) -> tuple[int, int]:
    n_tiles = max(1, -(-C // block_c))
    if tiles_per_program is None:
        tiles_per_program = max(1, min(n_tiles, round(B * Hk * n_tiles / _TARGET_PROGRAMS)))
    tiles_per_program = max(1, min(int(tiles_per_program), n_tiles))
    n_splits = -(-n_tiles // tiles_per_program)
    return tiles_per_program, n_splits


def window_logits(q, ktilde_pool, n_eff, layer, *, interpret: bool = False, block_c: int = 64,
                  tiles_per_program: int | None = None, num_warps: int = 4, num_stages: int = 3,
                  precision=None):
    """Raw stage-1 logits and per-split softmax statistics for one decode query per sequence.

    q [B, Hq, D]; ktilde_pool [L, B, C, Hk, D]; n_eff [B] valid windows (clipped to C); layer: int
    scalar (traced ok). Returns logits [B, Hk, G_pad, C_pad] (rows >= G and windows >= n_eff hold
    garbage), m, l [B, Hk, splits, G_pad] (max / sum of exp over the split's valid windows).
    """
    B, Hq, D = q.shape
    L, B2, C, Hk, D2 = ktilde_pool.shape
    if B2 != B or D2 != D or Hq % Hk:
        raise ValueError(f"shape mismatch: q {q.shape}, ktilde_pool {ktilde_pool.shape}")
    if not (_is_pow2(D) and D >= 16):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton dot, got {D}")
    if not (_is_pow2(block_c) and block_c >= 16):
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c}")
    G = Hq // Hk
    g_pad = max(16, _next_pow2(G))
    tpp, n_splits = _plan(C, B, Hk, block_c, tiles_per_program)
    split_len = tpp * block_c
    c_pad = n_splits * split_len

    qg = q.astype(jnp.float32).reshape(B, Hk, G, D)
    if g_pad != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, g_pad - G), (0, 0)))
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    kernel = functools.partial(_logits_kernel, G=G, block_c=block_c, tiles_per_program=tpp,
                               sqrt_d=float(math.sqrt(D)), precision=_dot_precision(precision, interpret))
    grid = (B, Hk, n_splits)
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (0,)),
        pl.BlockSpec((B,), lambda b, h, s: (0,)),
        pl.BlockSpec((None, None, g_pad, D), lambda b, h, s: (b, h, 0, 0)),
        # The whole pool of one (b, h): a pointer, nothing is copied; the layer is picked inside.
        pl.BlockSpec((L, None, C, None, D), lambda b, h, s: (0, b, 0, h, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, g_pad, split_len), lambda b, h, s: (b, h, 0, s)),
        pl.BlockSpec((None, None, None, g_pad), lambda b, h, s: (b, h, s, 0)),
        pl.BlockSpec((None, None, None, g_pad), lambda b, h, s: (b, h, s, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, Hk, g_pad, c_pad), jnp.float32),
        jax.ShapeDtypeStruct((B, Hk, n_splits, g_pad), jnp.float32),
        jax.ShapeDtypeStruct((B, Hk, n_splits, g_pad), jnp.float32),
    ]
    compiler_params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    logits, m, l = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params, name="nosa_decode_stage1",
    )(layer_arr, n_eff.astype(jnp.int32), qg, ktilde_pool)
    return logits, m, l


# ----------------------------------------------------------------------------- jnp finishing

def _pool_windows(x, q_pos, n_blocks: int, cfg: NosaConfig):
    """[B, Hk, W] window scores (-inf where invalid) -> [B, Hk, n_blocks] pooled with forcing.

    Block j = max over windows P j - 1 .. P j + P - 1 (as nosa.pool_blocks), computed as the max of
    the P windows of group j and the last window of group j - 1.
    """
    P = cfg.pool_stride
    B, Hk, W = x.shape
    need = n_blocks * P
    if W >= need:
        x = x[..., :need]
    else:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, need - W)), constant_values=NEG_INF)
    g = x.reshape(B, Hk, n_blocks, P)
    grp = jnp.max(g, axis=-1)
    prev = jnp.concatenate([jnp.full((B, Hk, 1), NEG_INF, x.dtype), g[..., :-1, P - 1]], axis=-1)
    pooled = jnp.maximum(grp, prev)
    j = jnp.arange(n_blocks)
    qb = (q_pos // cfg.block_size)[:, None, None]
    forced = (j < cfg.init_blocks) | ((j <= qb) & (qb <= j + cfg.local_blocks))
    return jnp.where(forced, POS_INF, pooled)


def _window_scores(logits, m, l, n_eff, G: int, n_windows: int):
    """Normalise the logits with the combined statistics and sum over the group: [B, Hk, W]."""
    M = jnp.max(m, axis=2)  # [B, Hk, G_pad]
    M = jnp.where(jnp.isfinite(M), M, 0.0)
    Z = jnp.sum(l * jnp.exp(m - M[:, :, None]), axis=2)
    Z = jnp.where(Z > 0, Z, 1.0)
    W = min(logits.shape[-1], n_windows)
    x = logits[:, :, :G, :W]
    p = jnp.exp(x - M[:, :, :G, None]) / Z[:, :, :G, None]
    S = jnp.sum(p, axis=2)
    valid = jnp.arange(W)[None, None, :] < n_eff[:, None, None]
    return jnp.where(valid, S, NEG_INF)


def decode_block_scores(q, ktilde_pool, n_win, q_pos, layer, *, nosa_cfg: NosaConfig, n_blocks: int,
                        interpret: bool = False, block_c: int = 64, tiles_per_program: int | None = None,
                        num_warps: int = 4, num_stages: int = 3, precision=None) -> jax.Array:
    """Pooled stage-1 block scores of one decode query per sequence. [B, Hk, n_blocks] float32.

    q [B, Hq, D]; ktilde_pool [L, B, C, Hk, D] (all layers; `layer` selects one inside the kernel);
    n_win [B] valid windows; q_pos [B] query positions (kv_len - 1). Equal to
    nosa.pool_blocks(nosa.stage1_scores(q[:, None], q_pos[:, None], ktilde_pool[layer], n_win)).
    """
    cfg = nosa_cfg
    B, Hq, D = q.shape
    C, Hk = ktilde_pool.shape[2], ktilde_pool.shape[3]
    G = Hq // Hk
    q_pos = jnp.asarray(q_pos, jnp.int32)
    if C == 0:
        return _pool_windows(jnp.full((B, Hk, 0), NEG_INF, jnp.float32), q_pos, n_blocks, cfg)
    n_eff = _effective_windows(jnp.asarray(n_win), q_pos, C, cfg)
    logits, m, l = window_logits(q, ktilde_pool, n_eff, layer, interpret=interpret, block_c=block_c,
                                 tiles_per_program=tiles_per_program, num_warps=num_warps,
                                 num_stages=num_stages, precision=precision)
    S = _window_scores(logits, m, l, n_eff, G, n_blocks * cfg.pool_stride)
    return _pool_windows(S, q_pos, n_blocks, cfg)


def decode_block_scores_reference(q, ktilde_pool, n_win, q_pos, layer, *, nosa_cfg: NosaConfig,
                                  n_blocks: int) -> jax.Array:
    """The jnp reference: nosa.stage1_scores + nosa.pool_blocks with Tq = 1. [B, Hk, n_blocks]."""
    q_pos = jnp.asarray(q_pos, jnp.int32)[:, None]
    kt = lax.dynamic_index_in_dim(ktilde_pool, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
    s1 = nosa.stage1_scores(q[:, None], q_pos, kt, jnp.asarray(n_win, jnp.int32), nosa_cfg)
    return nosa.pool_blocks(s1, q_pos, jnp.asarray(n_win, jnp.int32), n_blocks, nosa_cfg)[:, :, 0]


def _finish(idx, qb):
    idx = jnp.sort(idx, axis=-1)
    return jnp.where(idx > qb, -1, idx).astype(jnp.int32)


def select_from_scores(b_qk, cisw_layer, n_eff, q_pos, *, nosa_cfg: NosaConfig, n_blocks: int,
                       mode: str) -> jax.Array:
    """Two-stage top-k (spec 2.7) from pooled query-aware scores b_qk [B, Hk, n_blocks].

    cisw_layer [B, C, Hk] (mode "nosa"; ignored for "infllmv2"). Returns [B, Hk, K] int32.
    """
    cfg = nosa_cfg
    qb = (q_pos // cfg.block_size)[:, None, None]
    k_final = min(cfg.topk, n_blocks)
    if mode == "infllmv2":
        return _finish(lax.top_k(b_qk, k_final)[1], qb)
    if mode != "nosa":
        raise ValueError(f"decode_select: mode must be 'nosa' or 'infllmv2', got {mode!r}")
    B, Hk, _ = b_qk.shape
    C = cisw_layer.shape[1]
    cw = jnp.moveaxis(cisw_layer.astype(jnp.float32), 2, 1)  # [B, Hk, C]
    cw = jnp.where(jnp.arange(C)[None, None, :] < n_eff[:, None, None], cw, NEG_INF)
    b_cis = _pool_windows(cw, q_pos, n_blocks, cfg)
    j = jnp.arange(n_blocks)
    b_cis = jnp.where(j > qb, NEG_INF, b_cis)
    picks = lax.top_k(b_qk, min(cfg.qk_select, n_blocks))[1]
    bi = jnp.arange(B)[:, None, None]
    hi = jnp.arange(Hk)[None, :, None]
    b_cis = b_cis.at[bi, hi, picks].set(POS_INF)
    return _finish(lax.top_k(b_cis, k_final)[1], qb)


def decode_select(q, ktilde_pool, cisw_pool, n_win, kv_len, layer, *, nosa_cfg: NosaConfig,
                  n_blocks: int, mode: str, interpret: bool = False, **kernel_kw) -> jax.Array:
    """Block ids of one decode query per sequence: [B, Hk, K] int32, K = min(topk, n_blocks).

    Same contract as nosa.select_blocks(q[:, None], (kv_len - 1)[:, None], ktilde_pool[layer],
    cisw_pool[layer], kv_len, n_blocks, cfg, mode)[:, :, 0]: ascending ids, then -1.
    cisw_pool [L, B, C, Hk] (may be None for mode "infllmv2"). `kernel_kw` go to the kernel
    (block_c, tiles_per_program, num_warps, num_stages, precision).
    """
    cfg = nosa_cfg
    kv_len = jnp.asarray(kv_len, jnp.int32)
    q_pos = kv_len - 1
    C = ktilde_pool.shape[2]
    n_eff = _effective_windows(jnp.asarray(n_win), q_pos, C, cfg)
    b_qk = decode_block_scores(q, ktilde_pool, n_eff, q_pos, layer, nosa_cfg=cfg, n_blocks=n_blocks,
                               interpret=interpret, **kernel_kw)
    cisw_layer = None
    if mode == "nosa":
        # Only [B, C, Hk] (1/D of the keys' bytes); XLA fuses this slice into its consumer.
        cisw_layer = lax.dynamic_index_in_dim(cisw_pool, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
    return select_from_scores(b_qk, cisw_layer, n_eff, q_pos, nosa_cfg=cfg, n_blocks=n_blocks, mode=mode)


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
