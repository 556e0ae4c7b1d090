"""Prefill-time NOSA block selection (a chunk of query tokens per sequence) with a Pallas Triton kernel.

Semantics are exactly those of `nosa_jax.nosa.select_blocks` (spec 2.4-2.7), its reference:

  prefill_window_scores = nosa.stage1_scores(q, q_pos, ktilde_pool[layer], n_win)
  prefill_select        = nosa.select_blocks(q, q_pos, ktilde_pool[layer], cisw_pool[layer], kv_len, ...)

Why a kernel: the jnp reference materialises the logits of every (query head, token, window) in
float32 ([B, Hk, G, Tc, C]: 16x the window scores it keeps), softmaxes and sums them in separate
XLA passes, and ranks the blocks with three sorts per row. At prefill the stage-1 dot is the
work: Tc x Hq x C x D multiply-adds per chunk, compute-bound (the compressed keys of one
(sequence, kv head) are C x D x 2 bytes, L2-resident, and every query tile reads them).

Plan:
  kernel (grid B x Hk x token tiles, the last tiles first): each program holds `tile_t`
    consecutive query tokens of one (sequence, kv head) and all G heads of the group: R = tile_t *
    G_pad rows of q (G padded to a power of two >= 16 with zero rows, masked). It walks the window
    tiles visible to its last
    token twice, recomputing the logits q [R, D] x ktilde [block_c, D]^T the second time (flash
    style; a logits round trip through memory would cost more than the dot):
      pass 1  online softmax statistics per row (max, sum of exp) over the row's visible windows
              (c < n_win and S c + K - 1 <= the token's position);
      pass 2  p = exp(logit - max) / sum per row, summed over the G heads of each token (a reshape
              [tile_t, G_pad, block_c] and a sum), stored as the window scores [tile_t, block_c];
    the window tiles that every token of the tile sees (all but the last one or two of a row's
    walk) skip the visibility mask and the masked loads, about half the elementwise operations per
    logit by count (not measured yet); the padded heads' rows get weight 1 / inf = 0 instead;
    then it stores exact zeros over the windows past its visible range (invisible windows score 0
    in the reference too, and pooling reads them: the ties they make at the top-k's boundary must
    be the reference's), and -inf past n_win (the windows the pooling leaves out). The dot follows
    nosa.stage1_dot_dtype: bf16 / fp16 q and ktilde -> one native tensor-core pass with float32
    accumulation (exact products); float32 -> a float32-accurate precision
    (selection._dot_precision). At G = 16 the group's heads are read as one block of q as it is.
  pooling and forcing: the decode selection's `selection._pool_windows` on the window scores
    (reshapes, a max and one shifted column: one XLA fusion, exactly nosa.pool_blocks) and
    nosa.pool_blocks on the cis window means (mode "nosa"), as the reference does.
  top-k: the fused two-stage top-k kernel (pallas_kernels.topk.two_stage_select_pallas), one
    program per (sequence, kv head, token) row.
  lane buckets: a chunk's queries only ever pick among the first lanes_needed(q_pos) blocks (about
    the last query's block + 1; the later blocks rank below all of those in both stages and come
    out as -1), so the three steps above run on rows cut to the shortest of lane_buckets(n_blocks)
    (n_blocks, and a half and a quarter of the top-k's padded row) that holds them, picked by a
    lax.switch on the chunk's largest position. The top-k's compares, the scores written and the
    pooling scale with the row; a 32K prompt in the model's 2048-query chunks runs 7 chunks at 256
    lanes, 8 at 512 and one at 1024 instead of 16 at 1024.

Measured (H100, 32K prompt as one chunk, mode nosa, bench/NOTES.md session 29), the first version
(4 tokens per tile, XLA's gather pooling, q transposed): 4.37 ms against the jnp reference's 35.7
(calls of 256 queries) and the sparse attention's 7.79 (0.56x; issue 4 asks for <= 0.5x): kernel
2.49, top-k 0.96, pooling 0.76, q transpose 0.18. The kernel at 8 tokens per tile: 2.40 ms. The
present pooling and q layout are not measured on a GPU yet.

`interpret=True` runs the kernel on CPU (Pallas interpret mode).
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
from pallas_kernels.selection import _check_tiling, _dot, _dot_precision, _is_pow2, _pool_windows
from pallas_kernels.topk import two_stage_select_pallas

NEG_INF = float("-inf")
POS_INF = float("inf")


def _dot_nt(a, b, precision):
    """a [M, D] @ b [N, D]^T accumulated in float32 (the 16-bit path contracts both operands' last
    axis, which Triton lowers to a transposed shared-memory operand)."""
    if isinstance(precision, str) and precision == "native":
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return _dot(a, b.T, precision)


def _scores_kernel(layer_ref, nwin_ref, pos_ref, q_ref, k_ref, o_ref, *, G: int, g_pad: int, tile_t: int,
                   block_c: int, n_out_tiles: int, stride: int, ksize: int, sqrt_d: float, precision):
    """One (sequence b, kv head h, token tile) program.

    layer_ref [1] i32; nwin_ref [B] i32 (clipped to C); pos_ref [tile_t] i32 (the tokens'
    positions, -1 for padding); q_ref [tile_t, G_pad, D] or [R, D] (R = tile_t * G_pad rows,
    token-major, zero rows for heads >= G) in the dot dtype; k_ref [L, C, D] (this b, h; read at
    the traced layer); o_ref [tile_t, W] f32: window c's score, 0 where the token does not see it,
    -inf for c >= n_win (the pooling's clip).
    """
    b = pl.program_id(0)
    R = tile_t * g_pad
    layer = layer_ref[0]
    n = nwin_ref[b]
    pos = pos_ref[...]
    row_pos = jnp.broadcast_to(pos[:, None], (tile_t, g_pad)).reshape(R, 1)
    row_ok = (lax.broadcasted_iota(jnp.int32, (R, 1), 0) % g_pad) < G

    def n_visible(p):  # windows c < n with S c + K - 1 <= p
        return jnp.minimum(jnp.where(p >= ksize - 1, (jnp.maximum(p, ksize - 1) - (ksize - 1)) // stride + 1, 0), n)

    # Tiles of windows that some token of the tile sees (its last token has the largest position),
    # and the leading ones that every token sees (padding tokens, at position -1, left out: their
    # rows are cut off after the kernel). The latter need no mask: their logits go in as they are.
    n_tiles = (n_visible(jnp.max(pos)) + block_c - 1) // block_c
    full_tiles = k_ref.shape[1] >= block_c  # static: a pool narrower than a tile has none (none traced)
    n_full = n_visible(jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max))) // block_c if full_tiles else 0

    q = q_ref[...].reshape(R, q_ref.shape[-1])
    col = lax.broadcasted_iota(jnp.int32, (1, block_c), 1)
    krow = lax.broadcasted_iota(jnp.int32, (block_c, 1), 0)

    def logits(t, masked: bool):
        c0 = t * block_c
        if not masked:
            return _dot_nt(q, k_ref[layer, pl.ds(c0, block_c), :], precision) / sqrt_d, None
        k = pltriton.load(k_ref.at[layer, pl.ds(c0, block_c), :], mask=(c0 + krow) < n, other=0.0)
        s = _dot_nt(q, k, precision) / sqrt_d  # [R, block_c]
        c = c0 + col
        vis = row_ok & (c < n) & (stride * c + (ksize - 1) <= row_pos)
        return jnp.where(vis, s, NEG_INF), vis

    def stats(masked: bool):
        def body(t, carry):
            m, l = carry
            s, _ = logits(t, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
            l = l * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(s - m_safe), axis=1, keepdims=True)
            return m_new, l
        return body

    m_l = (jnp.full((R, 1), NEG_INF, jnp.float32), jnp.zeros((R, 1), jnp.float32))
    if full_tiles:
        m_l = lax.fori_loop(0, n_full, stats(False), m_l)
    m, l = lax.fori_loop(n_full, n_tiles, stats(True), m_l)
    m = jnp.where(m == NEG_INF, 0.0, m)
    # Padded heads' rows (zero q rows, unmasked in the full tiles) get 1 / inf = 0 weight.
    l = jnp.where(row_ok, jnp.where(l > 0, l, 1.0), POS_INF)

    def clip(t, x):  # [tile_t, block_c] window scores -> -inf past n_win
        return jnp.where(t * block_c + col < n, x, NEG_INF)

    def write(masked: bool):
        def body(t, carry):
            s, vis = logits(t, masked)
            p = jnp.exp(s - m) / l
            if masked:
                p = jnp.where(vis, p, 0.0)
            x = jnp.sum(p.reshape(tile_t, g_pad, block_c), axis=1)
            o_ref[:, pl.ds(t * block_c, block_c)] = clip(t, x) if masked else x
            return carry
        return body

    n_written = jnp.minimum(n_tiles, n_out_tiles)  # the output may be narrower than what the tile sees
    n_full = jnp.minimum(n_full, n_written)
    if full_tiles:
        lax.fori_loop(0, n_full, write(False), 0)
    lax.fori_loop(n_full, n_written, write(True), 0)

    def rest(t, carry):  # windows no token of the tile sees: 0, or -inf past n_win
        o_ref[:, pl.ds(t * block_c, block_c)] = clip(t, jnp.zeros((tile_t, block_c), jnp.float32))
        return carry

    lax.fori_loop(n_written, n_out_tiles, rest, 0)


def default_tile_t(G: int) -> int:
    """Tokens per program: 128 rows of q (8 tokens at G = 16; H100, 32K prompt: 2.40 ms against
    2.51 with 64 rows and 2.90 with 256, bench/NOTES.md session 29), at least one token."""
    return max(1, 128 // max(16, next_pow2(G)))


def _window_scores(q, q_pos, ktilde_pool, n_win, layer, width: int, *, nosa_cfg: NosaConfig, interpret: bool,
                   tile_t: int | None, block_c: int, num_warps: int, num_stages: int, precision):
    """The kernel's output [B, Hk, T_pad, W >= width]: window c's stage-1 score of each token (0
    where the token does not see it), -inf for c >= n_win; T_pad = Tc rounded up to the tile."""
    B, Tc, Hq, D = q.shape
    L, B2, C, Hk, D2 = ktilde_pool.shape
    if B2 != B or D2 != D or Hq % Hk or q_pos.shape != (B, Tc):
        raise ValueError(f"shape mismatch: q {q.shape}, q_pos {q_pos.shape}, ktilde_pool {ktilde_pool.shape}")
    _check_tiling(D, block_c)
    G = Hq // Hk
    g_pad = max(16, next_pow2(G))
    tile_t = default_tile_t(G) if tile_t is None else int(tile_t)
    if not _is_pow2(tile_t):
        raise ValueError(f"tile_t must be a power of two, got {tile_t}")
    t_pad = -(-Tc // tile_t) * tile_t
    n_out_tiles = max(1, -(-width // block_c))

    dot_dtype = nosa.stage1_dot_dtype(q.dtype, ktilde_pool.dtype)
    prec = _dot_precision(precision, interpret, dot_dtype)
    qd = jnp.pad(q.astype(dot_dtype), ((0, 0), (0, t_pad - Tc), (0, 0), (0, 0)))
    n_t = t_pad // tile_t
    # Programs in launch order take the last token tiles first: they see the most windows, and the
    # short programs of the first tokens then fill the last wave (as sparse_prefill orders its tiles).
    rev = lambda i: n_t - 1 - i  # noqa: E731
    if g_pad == G:  # the group's heads are one [tile_t, G, D] block of q as it is: no copy
        q_spec = pl.BlockSpec((None, tile_t, G, D), lambda b, h, i: (b, rev(i), h, 0))
    else:  # [B, Hk, T_pad * G_pad, D]: each (sequence, kv head)'s rows token-major, the heads padded
        qd = jnp.moveaxis(qd.reshape(B, t_pad, Hk, G, D), 2, 1)
        qd = jnp.pad(qd, ((0, 0), (0, 0), (0, 0), (0, g_pad - G), (0, 0))).reshape(B, Hk, t_pad * g_pad, D)
        q_spec = pl.BlockSpec((None, None, tile_t * g_pad, D), lambda b, h, i: (b, h, rev(i), 0))
    pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, t_pad - Tc)), constant_values=-1)
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    kernel = functools.partial(_scores_kernel, G=G, g_pad=g_pad, tile_t=tile_t, block_c=block_c,
                               n_out_tiles=n_out_tiles, stride=nosa_cfg.kernel_stride, ksize=nosa_cfg.kernel_size,
                               sqrt_d=float(math.sqrt(D)), precision=prec)
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, i: (0,)),
        pl.BlockSpec((B,), lambda b, h, i: (0,)),
        pl.BlockSpec((None, tile_t), lambda b, h, i: (b, rev(i))),
        q_spec,
        # The whole pool of one (b, h): a pointer, nothing is copied; the layer is picked inside.
        pl.BlockSpec((L, None, C, None, D), lambda b, h, i: (0, b, 0, h, 0)),
    ]
    out_spec = pl.BlockSpec((None, None, tile_t, n_out_tiles * block_c), lambda b, h, i: (b, h, rev(i), 0))
    out_shape = jax.ShapeDtypeStruct((B, Hk, t_pad, n_out_tiles * block_c), jnp.float32)
    compiler_params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel, grid=(B, Hk, n_t), in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params, name="nosa_prefill_stage1_scores",
    )(layer_arr, jnp.minimum(n_win.astype(jnp.int32), C), pos, qd, ktilde_pool)


def prefill_window_scores(q, q_pos, ktilde_pool, n_win, layer, *, nosa_cfg: NosaConfig, interpret: bool = False,
                          tile_t: int | None = None, block_c: int = 64, num_warps: int = 4, num_stages: int = 2,
                          precision=None):
    """Stage-1 window scores of a chunk of queries: nosa.stage1_scores(q, q_pos, ktilde_pool[layer], n_win).

    q [B, Tc, Hq, D]; q_pos [B, Tc] int; ktilde_pool [L, B, C, Hk, D] (the model dtype; the layer
    is read in place); n_win [B]; layer: int scalar (traced ok). Returns [B, Hk, Tc, C] float32.
    """
    B, Tc = q_pos.shape
    C, Hk = ktilde_pool.shape[2], ktilde_pool.shape[3]
    if C == 0 or Tc == 0:
        return jnp.zeros((B, Hk, Tc, C), jnp.float32)
    s = _window_scores(q, q_pos, ktilde_pool, n_win, layer, C, nosa_cfg=nosa_cfg, interpret=interpret, tile_t=tile_t,
                       block_c=block_c, num_warps=num_warps, num_stages=num_stages, precision=precision)
    s = s[:, :, :Tc, :C]
    return jnp.where(s == NEG_INF, 0.0, s)  # past n_win: 0, as the reference's softmax leaves it


def lanes_needed(q_pos, nosa_cfg: NosaConfig):
    """The blocks that can rank above the rest for the queries at q_pos (any shape, traced ok): an int32
    scalar n' such that every block j >= n' of every query's row is ranked below every block < n' in
    both stages of the selection, so it can only be picked once all of them are, and its id comes out
    as -1. n' = max(qb + 1, the last block pooling a visible window + 1, init_blocks) over the queries.

    Why: block j > qb is never forced (sink j < init_blocks, local blocks <= qb), and its stage-2
    (cis) score is -inf; a block with no visible window pools only zeros (invisible windows) and
    -inf (windows past n_win, a suffix of the blocks), so every stage-1 score below n' is >= its
    score, and the ties go to the lower id. The selection of a chunk whose queries lie early in the
    sequence therefore only needs the first n' blocks of each row.
    """
    cfg = nosa_cfg
    p = jnp.max(q_pos).astype(jnp.int32)
    # p sees windows 0 .. w - 1 (w = num_windows(p + 1)); block j pools windows P j - 1 .. P j + P - 1,
    # so the last block that pools a visible window is w // P.
    last_block = nosa.num_windows(p + 1, cfg) // cfg.pool_stride
    return jnp.maximum(jnp.maximum(p // cfg.block_size, last_block) + 1, cfg.init_blocks)


_MIN_BUCKET = 32  # the top-k pads shorter rows to one warp's width anyway


def lane_buckets(n_blocks: int) -> tuple[int, ...]:
    """The static row lengths prefill_select compiles for: n_blocks and the rows of a quarter and a
    half of its top-k row (padded to a power of two), where those are at least one warp wide. A chunk
    runs at the shortest one that holds lanes_needed; the top-k's work and the window scores written
    and pooled scale with it (a 32K prompt in 2048-query chunks: 16 rows of 1024 lanes -> 7 of 256,
    8 of 512, 1 of 1024 lanes, 2.4x less)."""
    n_pad = next_pow2(n_blocks)
    return tuple(sorted({n_blocks} | {n_pad // d for d in (4, 2) if _MIN_BUCKET <= n_pad // d < n_blocks}))


def prefill_select(q, q_pos, ktilde_pool, cisw_pool, kv_len, layer, *, nosa_cfg: NosaConfig, n_blocks: int,
                   mode: str, interpret: bool = False, tile_t: int | None = None, block_c: int = 64,
                   num_warps: int = 4, num_stages: int = 2, precision=None):
    """Block ids of a chunk of queries: nosa.select_blocks(q, q_pos, ktilde_pool[layer],
    cisw_pool[layer], kv_len, n_blocks, nosa_cfg, mode), with the window scores from the kernel
    (tile_t ... precision: its tiling), the pooling in one pass over them, and the fused top-k, all
    over the first n_b blocks of each row: the shortest of lane_buckets(n_blocks) that holds
    lanes_needed(q_pos) (a lax.switch; blocks past it pick as -1, as in the reference).

    q [B, Tc, Hq, D]; q_pos [B, Tc]; ktilde_pool [L, B, C, Hk, D]; cisw_pool [L, B, C, Hk] (mode
    "nosa"; ignored for "infllmv2"); kv_len [B]. Returns [B, Hk, Tc, min(topk, n_blocks)] int32.
    """
    if mode not in ("nosa", "infllmv2"):
        raise ValueError(f"block selection: mode must be 'nosa' or 'infllmv2', got {mode!r}")
    B, Tc = q_pos.shape
    C, Hk = ktilde_pool.shape[2], ktilde_pool.shape[3]
    n_win = nosa.num_windows(kv_len, nosa_cfg)
    K = min(nosa_cfg.topk, n_blocks)
    qb = (q_pos // nosa_cfg.block_size)[:, None, :, None]
    if mode == "nosa":
        cw = jnp.moveaxis(lax.dynamic_index_in_dim(cisw_pool, layer, 0, keepdims=False), 2, 1)[:, :, None, :]

    def select(n_b: int):
        if C == 0 or Tc == 0:  # no window to score (or no query): every block pools -inf, then the forcing
            s1 = jnp.full((B, Hk, Tc, 0), NEG_INF, jnp.float32)
        else:
            s1 = _window_scores(q, q_pos, ktilde_pool, n_win, layer, n_b * nosa_cfg.pool_stride, nosa_cfg=nosa_cfg,
                                interpret=interpret, tile_t=tile_t, block_c=block_c, num_warps=num_warps,
                                num_stages=num_stages, precision=precision)[:, :, :Tc]
        b_qk = _pool_windows(s1, q_pos, n_b, nosa_cfg)
        b_cis = nosa.pool_blocks(cw, q_pos, n_win, n_b, nosa_cfg) if mode == "nosa" else None
        ids = two_stage_select_pallas(b_qk, b_cis, qb, nosa_cfg, mode, interpret=interpret)
        return jnp.pad(ids, [(0, 0)] * 3 + [(0, K - ids.shape[-1])], constant_values=-1)

    buckets = lane_buckets(n_blocks)
    if len(buckets) == 1 or Tc == 0:
        return select(n_blocks)
    need = lanes_needed(q_pos, nosa_cfg)
    which = sum((need > b).astype(jnp.int32) for b in buckets[:-1])
    return lax.switch(which, [functools.partial(select, b) for b in buckets])
