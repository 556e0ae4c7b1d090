"""Block-sparse PREFILL attention with the NOSA eviction bias: a Pallas (Triton lowering) GPU kernel.

A chunk of Tc query tokens (consecutive positions, e.g. one prefill chunk) attends to the blocks
that each token's kv head selected. The kernel reads the model's stacked KV cache directly:
`k_pool`, `v_pool` [L, B, T, Hk, D] and `bias_pool` [L, B, T, Hk] stay in HBM
(`memory_space=pl.ANY`); every program computes the addresses of its blocks from the traced
`layer`, its (b, h) grid position and the block list, so no layer slice is ever materialised.

Math (must equal `nosa_jax.nosa.attention(q, q_pos, k_pool[layer], v_pool[layer], kv_len,
bias=bias_pool[layer], block_ids=block_ids, block_size=block_size)`): for query token t of
sequence b and each of the G = Hq / Hk query heads of kv head h,

    out = softmax_over_visible(q . k / sqrt(D) + bias) . v

in float32, the bias added UNSCALED after the 1/sqrt(D) scaling. Key s is visible iff
s <= q_pos[b, t], s < kv_len[b] and block s // block_size is in block_ids[b, h, t] (entries -1
or >= T / block_size are ignored; block_ids None = dense causal attention, the `full` mode).
Rows without a visible key give out = 0 and lse = -inf. lse = log-sum-exp of the visible logits
(natural log), kept for a later custom_vjp backward.

Structure (FlashAttention-2 forward over a block list):
  * A program owns a tile of `tile_q` consecutive query tokens x the G query heads of one kv head,
    i.e. M = tile_q * Gp rows (Gp = G rounded up to a power of two) for the matrix units.
    Grid (n_tiles, Hk, B), tile index fastest so that programs running together share blocks in L2;
    tiles are visited last-first (the heaviest causal tiles start first in dense mode).
  * Sparse mode: `tile_union` computes in jnp, per tile, the sorted union of the tokens' selected
    block ids (static length U = min(tile_q * K, T / block_size)), its true length, and for every
    union entry a tile_q-bit mask of the tokens that selected it. The kernel loops over the union
    (dynamic trip count), loads each K/V block once (pl.ds on the traced layer / b / h offsets),
    masks per row (membership bit, causality, kv_len) and runs an online softmax (base 2; the
    running max includes the bias).
  * Dense mode: the loop runs over blocks 0 .. ceil(min(max q_pos + 1, kv_len) / block_size) - 1.
  K/V/bias loads are masked to keys < kv_len, so padding past a sequence's length (whatever it
  holds, NaN included) never reaches the output.

Triton constraints (interpret mode does not check them): every array the kernel materialises must
have power-of-two sizes and each dot dimension must be >= 16, so on the GPU block_size, D and
M = tile_q * Gp must be powers of two >= 16 (`_check_gpu_shapes`). tile_q <= 32 (the membership
bits are one int32 per union entry). A non-power-of-two G is padded with zero query heads (one copy
of q); Tc not a multiple of tile_q is padded (one copy of q).
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
from pallas_kernels.lanes import next_pow2

NEG_INF = float("-inf")
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_TILE_Q = 32  # membership bits per union entry live in one int32
TARGET_ROWS = 64  # default tile: about this many (token, head) rows per program (H200 sweep, see bench)



def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def default_tile_q(G: int, Tc: int | None = None) -> int:
    """Tokens per program: about TARGET_ROWS rows (tile_q * Gp), at least 16 rows, at most
    MAX_TILE_Q tokens, and no more than the chunk needs. G=16 -> 4 (64 rows); G=32 -> 2;
    G=4 -> 16 (64 rows); G=2 -> 32 (64 rows); G=1 -> 32 (32 rows). Fewer tokens per tile means a
    tighter union of their block lists; 64 rows still fill a Hopper warpgroup MMA."""
    Gp = next_pow2(G)
    tq = max(1, min(MAX_TILE_Q, TARGET_ROWS // Gp))
    if Tc is not None:
        tq = min(tq, next_pow2(Tc))
    tq = max(tq, -(-16 // Gp))  # dot rows >= 16
    return next_pow2(tq)


def default_num_warps(rows: int, D: int) -> int:
    return 8 if rows * D >= 128 * 128 else 4


def _check_gpu_shapes(block_size: int, D: int, rows: int) -> None:
    for name, val in (("block_size", block_size), ("head_dim", D), ("rows per program (tile_q * Gp)", rows)):
        if not (_is_pow2(val) and val >= 16):
            raise ValueError(f"sparse_prefill_attention on the GPU (Triton) needs {name} to be a power of two "
                             f">= 16, got {val}; use interpret=True or the reference for other shapes")


def tile_union(block_ids: jax.Array, tile_q: int, n_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per tile of `tile_q` consecutive tokens: the union of their selected blocks.

    block_ids: [B, Hk, Tc, K] int32 (-1 / out-of-range entries ignored; Tc a multiple of tile_q);
    n_blocks: blocks of the pool's T axis. Returns
      blocks [B, Hk, nT, U] int32: ascending distinct block ids (entries past `count` are 0),
      bits   [B, Hk, nT, U] int32: bit r set iff token r of the tile selected that block,
      count  [B, Hk, nT]    int32: union length,
    with nT = Tc / tile_q and U = min(tile_q * K, n_blocks) (a static bound on the union length).
    """
    B, Hk, Tc, K = block_ids.shape
    nT = Tc // tile_q
    U = max(1, min(tile_q * K, n_blocks))
    ids = block_ids.astype(jnp.int32).reshape(B, Hk, nT, tile_q, K)
    ok = (ids >= 0) & (ids < n_blocks)
    ids = jnp.where(ok, ids, n_blocks)  # dump column, dropped below
    b_i = jnp.arange(B)[:, None, None, None, None]
    h_i = jnp.arange(Hk)[None, :, None, None, None]
    t_i = jnp.arange(nT)[None, None, :, None, None]
    r_i = jnp.arange(tile_q)[None, None, None, :, None]
    mem = jnp.zeros((B, Hk, nT, n_blocks + 1, tile_q), jnp.bool_)
    mem = mem.at[b_i, h_i, t_i, ids, r_i].set(True)[:, :, :, :n_blocks]  # duplicates are harmless
    bits_all = jnp.sum(mem.astype(jnp.int32) << jnp.arange(tile_q, dtype=jnp.int32), axis=-1)  # [B,Hk,nT,nb]
    nz = bits_all != 0
    count = jnp.sum(nz, axis=-1, dtype=jnp.int32)
    dest = jnp.where(nz, jnp.cumsum(nz, axis=-1, dtype=jnp.int32) - 1, U)  # U = dropped
    j = jnp.broadcast_to(jnp.arange(n_blocks, dtype=jnp.int32), bits_all.shape)
    bb, hh, tt = (jnp.arange(n)[idx] for n, idx in
                  ((B, (slice(None), None, None, None)), (Hk, (None, slice(None), None, None)),
                   (nT, (None, None, slice(None), None))))
    blocks = jnp.zeros((B, Hk, nT, U), jnp.int32).at[bb, hh, tt, dest].set(j, mode="drop")
    bits = jnp.zeros((B, Hk, nT, U), jnp.int32).at[bb, hh, tt, dest].set(bits_all, mode="drop")
    return blocks, bits, count


def _kernel(layer_ref, kvlen_ref, *refs, tile_q: int, Gp: int, D: int, block_size: int, n_tiles: int,
            n_blocks: int, scale: float, has_ids: bool, has_bias: bool):
    refs = list(refs)
    if has_ids:
        blk_ref, bits_ref, cnt_ref = refs[:3]
        refs = refs[3:]
    qpos_ref, q_ref, k_ref, v_ref = refs[:4]
    refs = refs[4:]
    bias_ref = refs.pop(0) if has_bias else None
    o_ref, lse_ref = refs
    i = n_tiles - 1 - pl.program_id(0)
    h = pl.program_id(1)
    b = pl.program_id(2)
    layer = layer_ref[0]
    kv_len = kvlen_ref[b]
    M = tile_q * Gp
    bs = block_size

    q = q_ref[...].reshape(M, D)  # model dtype; row r = (token r // Gp, head r % Gp)
    qp = qpos_ref[...]  # [tile_q] int32
    pos_r = jnp.broadcast_to(qp[:, None], (tile_q, Gp)).reshape(M)
    lim_r = jnp.minimum(pos_r, kv_len - 1)  # last visible key position of each row
    tok_r = lax.broadcasted_iota(jnp.int32, (M,), 0) // Gp
    offs = lax.broadcasted_iota(jnp.int32, (bs,), 0)
    qk_scale = scale * LOG2E

    if has_ids:
        n_iter = cnt_ref[b, h, i]
    else:
        last = jnp.minimum(jnp.max(qp) + 1, kv_len)
        n_iter = jnp.clip((last + bs - 1) // bs, 0, n_blocks)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        if has_ids:
            blk = blk_ref[b, h, i, j]
            bits = bits_ref[b, h, i, j]
            lim = jnp.where(((bits >> tok_r) & 1) != 0, lim_r, -1)
        else:
            blk = j
            lim = lim_r
        start = pl.multiple_of(blk * bs, bs)
        rows = pl.ds(start, bs)
        kpos = start + offs  # [bs]
        col_ok = kpos < kv_len
        kv_mask = jnp.broadcast_to(col_ok[:, None], (bs, D))
        k = pltriton.load(k_ref.at[layer, b, rows, h, :], mask=kv_mask, other=0)  # [bs, D]
        v = pltriton.load(v_ref.at[layer, b, rows, h, :], mask=kv_mask, other=0)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * qk_scale  # [M, bs], log2 units
        if has_bias:
            bias = pltriton.load(bias_ref.at[layer, b, rows, h], mask=col_ok, other=0.0)
            s = s + (bias.astype(jnp.float32) * LOG2E)[None, :]
        s = jnp.where(kpos[None, :] <= lim[:, None], s, NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, l_new

    init = (jnp.zeros((M, D), jnp.float32), jnp.full((M,), NEG_INF, jnp.float32), jnp.zeros((M,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_iter, body, init)
    has = l > 0
    out = acc / jnp.where(has, l, 1.0)[:, None]
    lse = jnp.where(has, m * LN2 + jnp.log(jnp.where(has, l, 1.0)), NEG_INF)
    pltriton.store(o_ref, out.reshape(tile_q, Gp, D).astype(o_ref.dtype))
    pltriton.store(lse_ref, lse.reshape(tile_q, Gp))


@functools.partial(jax.jit, static_argnames=("block_size", "tile_q", "interpret", "return_lse", "num_warps",
                                             "num_stages"))
def sparse_prefill_attention(q, q_pos, k_pool, v_pool, bias_pool, block_ids, kv_len, layer, *, block_size: int,
                             tile_q: int | None = None, interpret: bool = False, return_lse: bool = False,
                             num_warps: int | None = None, num_stages: int = 3):
    """Block-sparse (or dense causal) chunk attention over the stacked KV pool (Pallas/Triton).

    q: [B, Tc, Hq, D]; q_pos: [B, Tc] int32 absolute positions; k_pool, v_pool: [L, B, T, Hk, D];
    bias_pool: [L, B, T, Hk] float32 or None; block_ids: [B, Hk, Tc, K] int32 (ascending or not,
    -1 ignored) or None for dense causal attention; kv_len: [B] int32; layer: int32 scalar (may be
    traced). tile_q: tokens per program (None -> `default_tile_q`); num_warps (None -> 8 for
    >= 128x128 tiles else 4), num_stages: Triton tunables. H200 sweep (bench/kernels_prefill.py,
    Hq=32, Hk=2, D=128): tile_q=4 (64 rows), 4 warps, 3 stages was fastest; 8 warps at 64 rows
    and 4 stages were much slower.
    Returns out [B, Tc, Hq, D] (q.dtype), and lse [B, Tc, Hq] float32 if return_lse.
    """
    B, Tc, Hq, D = q.shape
    L, Bp, T, Hk, Dk = k_pool.shape
    if Bp != B or Dk != D or v_pool.shape != k_pool.shape or Hq % Hk:
        raise ValueError(f"shape mismatch: q {q.shape}, k_pool {k_pool.shape}, v_pool {v_pool.shape}")
    if q_pos.shape != (B, Tc):
        raise ValueError(f"q_pos {q_pos.shape} must be {(B, Tc)}")
    if bias_pool is not None and bias_pool.shape != k_pool.shape[:4]:
        raise ValueError(f"bias_pool {bias_pool.shape} must be {k_pool.shape[:4]}")
    if block_ids is not None and block_ids.shape[:3] != (B, Hk, Tc):
        raise ValueError(f"block_ids {block_ids.shape} must be {(B, Hk, Tc)} + (K,)")
    if T % block_size:
        raise ValueError(f"pool length {T} must be a multiple of block_size {block_size}")
    G = Hq // Hk
    Gp = next_pow2(G)
    tq = default_tile_q(G, Tc) if tile_q is None else int(tile_q)
    if not 1 <= tq <= MAX_TILE_Q:
        raise ValueError(f"tile_q must be in [1, {MAX_TILE_Q}], got {tq}")
    M = tq * Gp
    if not interpret:
        _check_gpu_shapes(block_size, D, M)
    nw = default_num_warps(M, D) if num_warps is None else int(num_warps)
    n_blocks = T // block_size
    has_ids = block_ids is not None
    K = block_ids.shape[-1] if has_ids else 0
    if Tc == 0 or (has_ids and K == 0):
        out = jnp.zeros_like(q)
        lse = jnp.full((B, Tc, Hq), NEG_INF, jnp.float32)
        return (out, lse) if return_lse else out

    n_tiles = -(-Tc // tq)
    Tcp = n_tiles * tq
    qpos = jnp.asarray(q_pos, jnp.int32)
    qq = q
    if Gp != G:  # zero query heads fill each group to a power of two
        qq = jnp.pad(qq.reshape(B, Tc, Hk, G, D), ((0, 0), (0, 0), (0, 0), (0, Gp - G), (0, 0)))
        qq = qq.reshape(B, Tc, Hk * Gp, D)
    if Tcp != Tc:  # padded tokens select nothing (sparse) or are discarded (dense)
        qq = jnp.pad(qq, ((0, 0), (0, Tcp - Tc), (0, 0), (0, 0)))
        qpos = jnp.pad(qpos, ((0, 0), (0, Tcp - Tc)), mode="edge")

    args = [jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(kv_len, jnp.int32).reshape(B)]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [any_spec, any_spec]
    if has_ids:
        ids = block_ids.astype(jnp.int32)
        if Tcp != Tc:
            ids = jnp.pad(ids, ((0, 0), (0, 0), (0, Tcp - Tc), (0, 0)), constant_values=-1)
        blocks, bits, count = tile_union(ids, tq, n_blocks)
        args += [blocks, bits, count]
        in_specs += [any_spec, any_spec, any_spec]
    rev = lambda i: n_tiles - 1 - i  # noqa: E731  (same visiting order as the kernel)
    args += [qpos, qq, k_pool, v_pool]
    in_specs += [pl.BlockSpec((None, tq), lambda i, h, b: (b, rev(i))),
                 pl.BlockSpec((None, tq, Gp, D), lambda i, h, b: (b, rev(i), h, 0)),
                 any_spec, any_spec]
    has_bias = bias_pool is not None
    if has_bias:
        args.append(bias_pool)
        in_specs.append(any_spec)
    out_shape = [jax.ShapeDtypeStruct((B, Tcp, Hk * Gp, D), q.dtype),
                 jax.ShapeDtypeStruct((B, Tcp, Hk * Gp), jnp.float32)]
    out_specs = [pl.BlockSpec((None, tq, Gp, D), lambda i, h, b: (b, rev(i), h, 0)),
                 pl.BlockSpec((None, tq, Gp), lambda i, h, b: (b, rev(i), h))]
    kernel = functools.partial(_kernel, tile_q=tq, Gp=Gp, D=D, block_size=block_size, n_tiles=n_tiles,
                               n_blocks=n_blocks, scale=1.0 / math.sqrt(D), has_ids=has_ids, has_bias=has_bias)
    out, lse = pl.pallas_call(
        kernel,
        grid=(n_tiles, Hk, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=num_stages),
        interpret=interpret,
        name="nosa_sparse_prefill",
    )(*args)
    out, lse = out[:, :Tc], lse[:, :Tc]
    if Gp != G:
        out = out.reshape(B, Tc, Hk, Gp, D)[:, :, :, :G].reshape(B, Tc, Hq, D)
        lse = lse.reshape(B, Tc, Hk, Gp)[..., :G].reshape(B, Tc, Hq)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("block_size", "return_lse"))
def _reference(q, q_pos, k_pool, v_pool, bias_pool, block_ids, kv_len, layer, *, block_size: int,
               return_lse: bool = False):
    lyr = jnp.asarray(layer, jnp.int32)
    k, v = k_pool[lyr], v_pool[lyr]
    bias = None if bias_pool is None else bias_pool[lyr]
    return nosa.attention(q, q_pos, k, v, kv_len, bias=bias, block_ids=block_ids, block_size=block_size,
                          return_lse=return_lse)


def sparse_prefill_attention_reference(q, q_pos, k_pool, v_pool, bias_pool, block_ids, kv_len, layer, *,
                                       block_size: int, return_lse: bool = False, **unused):
    """Plain-jnp reference with the kernel's interface (dense masks over the whole pool):
    nosa.attention(q, q_pos, k_pool[layer], v_pool[layer], kv_len, bias=bias_pool[layer],
    block_ids=block_ids, block_size=block_size); with return_lse also the log-sum-exp [B, Tc, Hq].
    Kernel-only keywords (tile_q, interpret, num_warps, ...) are accepted and ignored."""
    return _reference(q, q_pos, k_pool, v_pool, bias_pool, block_ids, kv_len, layer, block_size=block_size,
                      return_lse=return_lse)
