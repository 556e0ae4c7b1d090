"""Block-sparse decode attention with the NOSA eviction bias: a Pallas (Triton lowering) GPU kernel.

One query token per sequence attends to the blocks its kv head selected. The kernel reads the
model's stacked KV cache directly: `k_pool`, `v_pool` [L, B, T, Hk, D] and `bias_pool` [L, B, T, Hk]
stay in HBM (`memory_space=pl.ANY`), and every program computes the addresses of its blocks from
the traced `layer`, its (b, h) grid position and the slot table, so no layer slice or gathered
copy is ever materialised (the kernel runs inside the model's `scan` over layers).

Math (must equal `nosa_jax.nosa.gathered_block_attention`): for each sequence b and kv head h the
G = Hq / Hk query heads h*G .. h*G+G-1 share that head's blocks, and

    out = softmax_over_visible(q . k / sqrt(D) + bias) . v

in float32, the bias added UNSCALED after the 1/sqrt(D) scaling. Token i of logical block j sits at
position j * block_size + i and is visible iff j >= 0 and position <= q_pos[b]; its key/value live at
pool token slots[b, h, e] * block_size + i. Rows without a visible key give 0.

Structure (flash-decoding / split-K):
  grid (B, Hk, k_splits); program (b, h, s) loads its G query rows (gathered straight from q, padded
  to Gp rows in registers), walks entries s*E .. s*E+E-1 (E = ceil(K / k_splits)) of the (padded)
  block table with an online softmax whose running max includes the bias, and writes an
  unnormalised partial output [Gp, D] plus its running max and sum [Gp]. With k_splits == 1 the
  kernel normalises and writes the output itself. Invalid entries (id < 0, a block wholly after the
  query, table padding) issue masked loads that move no data. The splits are merged either
  - merge="jnp": in jnp after the kernel (`merge_splits`, with `lax.optimization_barrier` on the
    merged max, as jax's decode kernel does). Measured on the H200: 3-4 small XLA fusions (~1.2-1.6
    us each, ~3 us at B=16), which at batch 1 is as long as the main kernel (~4.3 us). A separate
    Pallas merge kernel with one program per (b, kv head) looping over the splits was slower (7 us at
    B=16, 41 us at B=1: too few programs, serial latency), so it was dropped; or
  - merge="kernel": inside the same kernel, "last program merges". An int32 counter per (b, h),
    all zero on entry (an input aliased to an output), counts the finished splits: each program
    stores its partial, then atomically adds 1 to counter[b, h]; the program that reads
    k_splits - 1 back is the last of its (b, h), sets counter[b, h] back to 0 (no other program of
    (b, h) touches it after its add), and reads every split's partial back
    (outputs of this same pallas_call, in L2) and writes the normalised rows h*G .. h*G+G-1 of the
    [B, Hq, D] output with `merge_splits`'s math: combined max M and corrections exp(m_s - M) from
    one masked [S, Gp] load of every split's m (S = k_splits padded to a power of two), l_sum from
    one such load of l, and o_sum from [C, Gp, D] chunks of C splits (C * Gp * D <= MERGE_CHUNK
    f32). A loop over single splits would cost one dependent L2 round trip per split (Triton's
    lowering of fori_loop cannot unroll) - 64 at B=1 - in the one program per (b, h) that merges;
    this way it is 1 + ceil(k_splits / C) (C = 4 at Gp=16, D=128). No XLA op follows the kernel.
    Since the kernel leaves the counter zero, a caller may carry it from call to call (`count=` here,
    `Fetch.count` in the fetching variant; both caches keep one); otherwise each call zeroes a fresh
    one with `jnp.zeros`, which XLA turns into one constant copied before each in-place use (a 1 us
    memcpy per layer in the 8B decode step, seen in its optimized HLO in session 27).
    Memory ordering: Pallas Triton lowers the atomic to `tt.atomic_rmw add, acq_rel, gpu` (see
    `_atomic_rmw` in jax/_src/pallas/triton/lowering.py), which Triton issues from ONE thread of the
    program, then broadcasts through shared memory behind a barrier. The release half orders only
    that thread's own earlier writes (and, cumulatively, writes it has observed), so a CTA barrier
    (`pltriton.debug_barrier`, bar.sync) before the atomic is needed to make every thread's partial
    stores happen-before the release; symmetrically the last program takes a barrier after its
    acquire before all its threads read the other programs' partials (Triton's broadcast barrier
    already does this; the explicit one costs one bar.sync in B * Hk programs and does not rely on
    it). Both barriers are left out in interpret mode, where `debug_barrier` has no CPU lowering and
    the programs run one after another anyway (the atomic is an ordinary read-modify-write there).

Fetching variant (`sparse_decode_attention_fetch`, the offloaded step's loads + attention): the
same programs also take a `Fetch` (the pinned host store, the cis history, the step's load list and
the new token). An entry that is a miss reads its block from the host store in place (Triton reads
pinned memory over PCIe) instead of the pool and stores it into its slot on the way; the entry
whose slot holds the new token's row takes the token there. The pools are outputs aliased to their
operands, so they are updated in place exactly as `kv_loader.load_blocks` would update them, and
the PCIe reads of one program overlap the HBM reads and math of the others.

Triton constraints (interpret mode does not check them): every array the kernel materialises must
have power-of-two sizes and each dot dimension must be >= 16. The G query rows are padded to
Gp = max(16, next_pow2(G)); block_size and D must be powers of two >= 16 on the GPU (64 and 128 in
the model). `_check_gpu_shapes` enforces this whenever `interpret=False`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lanes import next_pow2

NEG_INF = float("-inf")
DEFAULT_NUM_SMS = 132  # H100/H200
# How sparse_decode_attention merges the splits by default: "auto" = "kernel" up to
# KERNEL_MERGE_MAX_SPLITS splits, else "jnp". H200, bf16, D=128, 64 blocks of 64 tokens, bias
# (bench/results/kernels_decode-2026-12-04): kernel vs jnp merge 26.1 vs 26.9 us (32/2 heads, B=16,
# 8 splits), 71.9 vs 75.8 (B=64, 3 splits), 74.7 vs 76.4 (32/8, B=16, 3 splits), 25.5 vs 26.4 (12/2,
# B=16, 16 splits); but 21.5 vs 10.3 us at B=1 (64 splits: the last program merges them serially),
# 28.4 vs 27.0 (32/2, B=16, 16 splits) and 58.5 vs 35.9 (64 splits).
DEFAULT_MERGE = "auto"
KERNEL_MERGE_MAX_SPLITS = 8
PROGRAMS_PER_SM = 2  # split-K target: about this many programs per SM (see default_k_splits)
MERGE_CHUNK = 8192  # merge="kernel": f32 elements of partial outputs loaded at once (64 regs/thread at 4 warps)



def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def num_sms() -> int:
    """Streaming multiprocessors of the default device (DEFAULT_NUM_SMS off-GPU or if unknown)."""
    try:
        d = jax.devices()[0]
        if d.platform == "gpu":
            return int(getattr(d, "core_count", DEFAULT_NUM_SMS) or DEFAULT_NUM_SMS)
    except Exception:  # pragma: no cover - no backend
        pass
    return DEFAULT_NUM_SMS


def default_k_splits(batch: int, num_kv_heads: int, num_entries: int, sms: int | None = None) -> int:
    """Splits of the K block-table entries so that B * Hk * k_splits reaches about
    PROGRAMS_PER_SM programs per SM (flash-decoding); never more splits than entries, and rounded
    so that no split is empty (k_splits = ceil(K / ceil(K / k_splits))).

    On an H200 (132 SMs), K=64: B=1, Hk=2 -> 64 (one block each); B=1, Hk=8 -> 32;
    B=16, Hk=2 -> 8 (256 programs); B=16, Hk=8 -> 3 (22 blocks each); B=64, Hk=8 -> 1.
    Measured (H200, blocks of 64, D=128, bf16): at B=16/Hk=8 and B=64/Hk=2, 384 programs (ks=3) ran
    at 3.6-3.9 TB/s, 128 (ks=1) at 2.4 TB/s and 768 (ks=6) at 3.0 TB/s; at B=16/Hk=2, ks=8 and 16
    tie. More splits also mean more partial-output traffic and a bigger merge.
    """
    sms = sms or num_sms()
    K = max(1, int(num_entries))
    want = -(-(PROGRAMS_PER_SM * sms) // max(1, batch * num_kv_heads))
    ks = max(1, min(K, want))
    per = -(-K // ks)
    return -(-K // per)


def _check_gpu_shapes(block_size: int, D: int, Gp: int) -> None:
    for name, val in (("block_size", block_size), ("head_dim", D), ("padded group", Gp)):
        if not (_is_pow2(val) and val >= 16):
            raise ValueError(f"sparse_decode_attention on the GPU (Triton) needs {name} to be a power of two "
                             f">= 16, got {val}; use interpret=True or the reference for other shapes")


def _finite(m):
    """A running max with -inf (no visible key yet) replaced by 0, so that exp(x - m) never computes
    (-inf) - (-inf) and gives exp(-inf) = 0 for masked / empty entries instead."""
    return jnp.where(m == NEG_INF, 0.0, m)


def _normalise(acc, l):
    """acc [..., D] / l [...]; rows with l == 0 (no visible key) give 0."""
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def _rows(h, group: int, Gp: int):
    """Row indices h*G + r of q for r < Gp (clamped to the head's last row, so every index is in
    bounds even in interpret mode) and the mask r < G."""
    r = lax.broadcasted_iota(jnp.int32, (Gp,), 0)
    return h * group + jnp.minimum(r, group - 1), r < group


def _decode_kernel(layer_ref, qpos_ref, ids_ref, slots_ref, q_ref, k_ref, v_ref, *rest,
                   block_size: int, per_split: int, num_entries: int, scale: float, has_bias: bool,
                   add_bias: bool, fetch: bool, group: int, Gp: int, normalize: bool, merge_splits_here: int,
                   gpu: bool):
    """One program (b, h, s); see the module docstring. Refs after v_ref: [bias_ref] (has_bias);
    with `fetch`, loads, row, new_k, new_v, new_cis, host_kv, cis (see `sparse_decode_attention_fetch`);
    and, if merge_splits_here (= k_splits > 1, merge="kernel"), the counter's input (aliased,
    unused); then the outputs: [o] if normalize; else [out [B, Hq, D] if merge_splits_here] +
    partial o, m, l [+ counter [B, Hk] int32 if merge_splits_here]; with `fetch`, then the pools
    k, v, bias (aliased to k_ref, v_ref, bias_ref). add_bias: the bias enters the logits (has_bias
    alone: the pool is only written, as the infllmv2 mode's fetch does)."""
    if has_bias:
        bias_ref, *rest = rest
    else:
        bias_ref = None
    if fetch:
        loads_ref, row_ref, newk_ref, newv_ref, newc_ref, host_ref, cis_ref, *rest = rest
        *rest, pk_out, pv_out, pb_out = rest
    outs = rest[1:] if merge_splits_here else rest
    b = pl.program_id(0)
    h = pl.program_id(1)
    s = pl.program_id(2)
    layer = layer_ref[0]
    q_pos = qpos_ref[b]
    D = q_ref.shape[-1]
    q_rows, rows_ok = _rows(h, group, Gp)
    q = q_ref[b, q_rows, :]  # [Gp, D] gather of this kv head's query rows
    if group < Gp:
        q = jnp.where(rows_ok[:, None], q, jnp.zeros_like(q))
    offs = lax.broadcasted_iota(jnp.int32, (block_size,), 0)
    if fetch:  # this (b, h)'s new token: its pool row (-1: none) and values
        row = row_ref[b, h]
        new_k = pltriton.load(newk_ref.at[b, h, :])[None, :]  # [1, D]
        v_head = h + newv_ref.shape[1] - newk_ref.shape[1]  # new_v's values are its last Hk heads
        new_v = pltriton.load(newv_ref.at[b, v_head, :])[None, :]
        new_c = newc_ref[b, h]

    def body(i, carry):
        acc, m_prev, l_prev = carry
        e = s * per_split + i
        if num_entries % per_split:  # the last split runs past the table: those entries are unused
            e_in = jnp.minimum(e, num_entries - 1)
            blk = jnp.where(e < num_entries, ids_ref[b, h, e_in], -1)
            slot = slots_ref[b, h, e_in]
            ld = jnp.where(e < num_entries, loads_ref[b, h, e_in], -1) if fetch else None
        else:
            blk = ids_ref[b, h, e]
            slot = slots_ref[b, h, e]
            ld = loads_ref[b, h, e] if fetch else None
        visible = (blk >= 0) & (offs + blk * block_size <= q_pos)  # [bs]
        slot = jnp.where(blk >= 0, slot, 0)  # keep even the masked addresses inside the pool
        start = pl.multiple_of(slot * block_size, block_size)
        tok = pl.ds(start, block_size)
        kv_mask = jnp.broadcast_to(visible[:, None], (block_size, D))
        if fetch:
            k, v, bias = _fetch_block(k_ref, v_ref, bias_ref, host_ref, cis_ref, pk_out, pv_out, pb_out, layer, b, h,
                                      blk, ld, tok, visible, offs, row - start, new_k, new_v, new_c,
                                      block_size=block_size, D=D)
        else:
            k = pltriton.load(k_ref.at[layer, b, tok, h, :], mask=kv_mask, other=0)  # [bs, D]
            v = pltriton.load(v_ref.at[layer, b, tok, h, :], mask=kv_mask, other=0)
            bias = pltriton.load(bias_ref.at[layer, b, tok, h], mask=visible, other=0.0) if add_bias else None
        sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        sc = sc * scale  # [Gp, bs]
        if add_bias:
            sc = sc + bias.astype(jnp.float32)[None, :]
        sc = jnp.where(visible[None, :], sc, NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))  # running max includes the bias
        m_use = _finite(m_new)  # all-masked rows: no (-inf) - (-inf)
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(sc - m_use[:, None])  # masked keys: exp(-inf) = 0
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, l_new

    init = (jnp.zeros((Gp, D), jnp.float32), jnp.full((Gp,), NEG_INF, jnp.float32),
            jnp.zeros((Gp,), jnp.float32))
    acc, m, l = lax.fori_loop(0, per_split, body, init)
    # Plain stores (`ref[...] = x` lowers to a swap, which would also load the old contents).
    if normalize:  # k_splits == 1: the final output [Gp, D]
        (o_ref,) = outs
        pltriton.store(o_ref, _normalise(acc, l).astype(o_ref.dtype))
        return
    if merge_splits_here:  # the partials are whole [B, Hk, ks, ...] arrays (pl.ANY): this split's part
        out_ref, o_all, m_all, l_all, cnt_ref = outs
        o_ref, m_ref, l_ref = (r.at[b, h, s] for r in (o_all, m_all, l_all))
    else:
        o_ref, m_ref, l_ref = outs
    if group < Gp:  # only the real rows: padding rows stay unwritten and are never read
        pltriton.store(o_ref, acc, mask=jnp.broadcast_to(rows_ok[:, None], (Gp, D)))
        pltriton.store(m_ref, m, mask=rows_ok)
        pltriton.store(l_ref, l, mask=rows_ok)
    else:
        pltriton.store(o_ref, acc)
        pltriton.store(m_ref, m)
        pltriton.store(l_ref, l)
    if merge_splits_here:
        _merge_if_last(out_ref, o_all, m_all, l_all, cnt_ref, b, h, rows_ok, splits=merge_splits_here,
                       group=group, Gp=Gp, gpu=gpu)


def _fetch_block(k_ref, v_ref, bias_ref, host_ref, cis_ref, pk_out, pv_out, pb_out, layer, b, h, blk, ld, tok,
                 visible, offs, token_off, new_k, new_v, new_c, *, block_size: int, D: int):
    """One table entry's K, V [bs, D] and bias [bs] for the fetching kernel, with the pool updated:
    a miss (ld >= 0) reads its whole block from the host store (and the bias rows from the cis
    history) and writes it into its slot; a hit reads the pool. The entry whose slot holds the new
    token's row (row - slot * bs = token_off in [0, bs)) takes the token there and writes that row
    (or carries it in the block a miss writes). Rows the query does not see are zeroed (a missed
    block may hold anything past the sequence's end)."""
    miss = ld >= 0
    src = jnp.maximum(ld, 0)  # (the K / V index below is typed: a Python int fails in interpret mode)
    whole = jnp.broadcast_to(miss, (block_size, D))
    from_pool = jnp.broadcast_to((visible & ~miss)[:, None], (block_size, D))
    k = jnp.where(miss, pltriton.load(host_ref.at[layer, b, h, src, jnp.int32(0), :, :], mask=whole, other=0),
                  pltriton.load(k_ref.at[layer, b, tok, h, :], mask=from_pool, other=0))
    v = jnp.where(miss, pltriton.load(host_ref.at[layer, b, h, src, jnp.int32(1), :, :], mask=whole, other=0),
                  pltriton.load(v_ref.at[layer, b, tok, h, :], mask=from_pool, other=0))
    rows = pl.ds(pl.multiple_of(src * block_size, block_size), block_size)
    bias = jnp.where(miss, pltriton.load(cis_ref.at[layer, b, rows, h], mask=jnp.broadcast_to(miss, (block_size,)),
                                         other=0.0),
                     pltriton.load(bias_ref.at[layer, b, tok, h], mask=visible & ~miss, other=0.0))
    here = (blk >= 0) & (offs == token_off)  # [bs]: the new token's row
    k = jnp.where(here[:, None], new_k, k)
    v = jnp.where(here[:, None], new_v, v)
    bias = jnp.where(here, new_c, bias)
    write = miss | here  # the whole block on a miss, else at most the token's row
    wmask = jnp.broadcast_to(write[:, None], (block_size, D))
    pltriton.store(pk_out.at[layer, b, tok, h, :], k, mask=wmask)
    pltriton.store(pv_out.at[layer, b, tok, h, :], v, mask=wmask)
    pltriton.store(pb_out.at[layer, b, tok, h], bias, mask=write)
    kv_mask = jnp.broadcast_to(visible[:, None], (block_size, D))
    return k, jnp.where(kv_mask, v, jnp.zeros_like(v)), jnp.where(visible, bias, 0.0)


def _merge_if_last(out_ref, o_ref, m_ref, l_ref, cnt_ref, b, h, rows_ok, *, splits: int, group: int, Gp: int,
                   gpu: bool):
    """merge="kernel": count this program's split as done; the last one of (b, h) merges all
    `splits` partials o [.., Gp, D], m, l [.., Gp] of (b, h) (as `merge_splits`) into rows
    h*G .. h*G+G-1 of out_ref [B, Hq, D]. Memory ordering: see the module docstring."""
    if gpu:
        pltriton.debug_barrier()  # every thread's partial stores happen-before the release below
    done = pltriton.atomic_add(cnt_ref, (b, h), jnp.int32(1))  # acq_rel, gpu scope; returns the old count

    @pl.when(done == splits - 1)
    def _():
        if gpu:
            pltriton.debug_barrier()  # the acquire (by one thread) covers all threads' loads below
        D = o_ref.shape[-1]
        Sp = next_pow2(splits)  # the split axis padded to a power of two (masked)
        C = min(Sp, max(1, MERGE_CHUNK // (Gp * D)))  # splits per [C, Gp, D] chunk of o

        def load(ref, start, n, other):  # splits start .. start+n-1 of (b, h): [n, Gp] or [n, Gp, D]
            part = ref.at[b, h, pl.ds(start, n)]
            ok = (lax.broadcasted_iota(jnp.int32, (n, Gp), 0) + start < splits) & rows_ok[None, :]
            if len(part.shape) == 3:
                ok = jnp.broadcast_to(ok[:, :, None], part.shape)
            return pltriton.load(part, mask=ok, other=other)  # padding rows / splits: neutral values

        m_s = load(m_ref, 0, Sp, NEG_INF)  # [Sp, Gp]
        m_max = _finite(jnp.max(m_s, axis=0))
        l_sum = jnp.sum(jnp.exp(m_s - m_max[None, :]) * load(l_ref, 0, Sp, 0.0), axis=0)

        def add_chunk(c, o_sum):
            start = pl.multiple_of(c * C, C)
            corr = jnp.exp(load(m_ref, start, C, NEG_INF) - m_max[None, :])  # no visible key: 0
            return o_sum + jnp.sum(corr[:, :, None] * load(o_ref, start, C, 0.0), axis=0)

        o_sum = lax.fori_loop(0, -(-splits // C), add_chunk, jnp.zeros((Gp, D), jnp.float32))
        out = _normalise(o_sum, l_sum).astype(out_ref.dtype)
        cnt_ref[b, h] = jnp.int32(0)  # every split has counted: left zero for the next call
        # Rows h*G .. h*G+Gp-1: the padding rows (another head's, or past the end) are masked off.
        dst = out_ref.at[b, pl.ds(h * group, Gp), :]
        if group < Gp:
            pltriton.store(dst, out, mask=jnp.broadcast_to(rows_ok[:, None], out.shape))
        else:
            pltriton.store(dst, out)


def _check_merge(merge) -> None:
    if merge not in (None, "auto", "jnp", "kernel"):
        raise ValueError(f"unknown merge {merge!r}: expected 'auto', 'jnp' or 'kernel'")


def check_args(q, k_pool, v_pool, bias_pool, block_ids, slots, block_size: int):
    """Validate the decode interface shared by every backend; returns (B, Hq, D, Hk, K)."""
    B, Hq, D = q.shape
    L, Bp, T, Hk, Dk = k_pool.shape
    K = block_ids.shape[-1]
    if Bp != B or Dk != D or v_pool.shape != k_pool.shape or Hq % Hk:
        raise ValueError(f"shape mismatch: q {q.shape}, k_pool {k_pool.shape}, v_pool {v_pool.shape}")
    if block_ids.shape != (B, Hk, K) or slots.shape != (B, Hk, K):
        raise ValueError(f"block_ids {block_ids.shape} / slots {slots.shape} must be {(B, Hk, K)}")
    if bias_pool is not None and bias_pool.shape != k_pool.shape[:4]:
        raise ValueError(f"bias_pool {bias_pool.shape} must be {k_pool.shape[:4]}")
    if T % block_size:
        raise ValueError(f"pool length {T} must be a multiple of block_size {block_size}")
    return B, Hq, D, Hk, K


def plan_splits(B: int, Hk: int, K: int, k_splits: int | None) -> tuple[int, int]:
    """(splits, entries per split) for K entries: the default heuristic or the request, clipped to
    [1, K], with no empty split."""
    ks = default_k_splits(B, Hk, K) if k_splits is None else int(k_splits)
    ks = max(1, min(ks, K))
    per = -(-K // ks)
    return -(-K // per), per


def merge_splits(o, m, l, G: int, dtype):
    """Combine split-K partials o [B, Hk, S, Gp, D], m, l [B, Hk, S, Gp] (unnormalised output,
    running max, running sum; only the first G rows are real) into [B, Hk*G, D]."""
    o, m, l = o[:, :, :, :G], m[:, :, :, :G], l[:, :, :, :G]
    B, Hk, _, _, D = o.shape
    m_all = jnp.max(m, axis=2, keepdims=True)  # [B, Hk, 1, G]
    m_all = lax.optimization_barrier(m_all)  # as jax's decode_attention (NaNs without it there)
    corr = jnp.exp(m - _finite(m_all))  # splits without a visible key: exp(-inf) = 0
    l_sum = jnp.sum(l * corr, axis=2)  # [B, Hk, G]
    o_sum = jnp.sum(o * corr[..., None], axis=2)  # [B, Hk, G, D]
    return _normalise(o_sum, l_sum).reshape(B, Hk * G, D).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "k_splits", "num_warps", "num_stages", "interpret",
                                             "backend", "merge"))
def sparse_decode_attention(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, *,
                            block_size: int, k_splits: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool = False, backend: str = "triton",
                            merge: str | None = None, count: jax.Array | None = None):
    """Block-sparse decode attention over the stacked KV pool (Pallas/Triton, split-K).

    q: [B, Hq, D]; k_pool, v_pool: [L, B, T, Hk, D]; bias_pool: [L, B, T, Hk] float32 or None;
    block_ids: [B, Hk, K] int32 logical block ids (-1 unused, any order); slots: [B, Hk, K] int32
    physical block of each entry in the pool's T axis; q_pos: [B] int32; layer: int32 scalar
    (may be traced). k_splits: None -> `default_k_splits`. Returns [B, Hq, D] in q.dtype.
    backend: "triton" (this kernel) or "mosaic" (`sparse_decode_mgpu.sparse_decode_attention_mgpu`,
    Mosaic GPU; num_warps/num_stages are ignored there, interpret=True means InterpretGPUParams()).
    merge (Triton backend, k_splits > 1): "jnp" (`merge_splits` after the kernel), "kernel" (the
    last program of each (b, h) merges, see the module docstring) or "auto" ("kernel" up to
    KERNEL_MERGE_MAX_SPLITS splits, measured faster there, else "jnp"); None -> DEFAULT_MERGE. The
    Mosaic backend always merges in jnp ("auto" included).
    count: None, or a [B, Hk] int32 array of zeros that the caller carries from call to call: the
    in-kernel merge's counter (module docstring), which the kernel leaves zero again; then the
    result is (out, count after the call).
    """
    _check_merge(merge)
    _check_count(count, q.shape[0], k_pool.shape[3])
    if backend == "mosaic":
        if merge == "kernel":
            raise ValueError("merge='kernel' is only implemented for backend='triton' (the Mosaic backend "
                             "merges the splits in jnp)")
        from pallas_kernels.sparse_decode_mgpu import sparse_decode_attention_mgpu
        out = sparse_decode_attention_mgpu(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer,
                                           block_size=block_size, k_splits=k_splits, interpret=interpret)
        return out if count is None else (out, count)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}: expected 'triton' or 'mosaic'")
    check_args(q, k_pool, v_pool, bias_pool, block_ids, slots, block_size)
    if block_ids.shape[-1] == 0:
        return jnp.zeros_like(q) if count is None else (jnp.zeros_like(q), count)
    out, count = _triton_decode(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, None, count,
                                add_bias=bias_pool is not None, block_size=block_size, k_splits=k_splits,
                                num_warps=num_warps, num_stages=num_stages, interpret=interpret, merge=merge)
    return out if count is None else (out, count)


def _check_count(count, B: int, Hk: int) -> None:
    if count is not None and (count.shape != (B, Hk) or count.dtype != jnp.int32):
        raise ValueError(f"count {count.shape} {count.dtype} must be {(B, Hk)} int32 (zeros, carried by the caller)")


class Fetch(NamedTuple):
    """What `sparse_decode_attention_fetch` loads and writes besides attending (the offloaded
    cache's step 4, `nosa_jax.offload.decode_attend`): host_kv [L, B, Hk, NB, 2, bs, D] (K and V of
    each block; normally pinned_host memory, read in place), cis [L, B, T, Hk] float32 (the eviction
    score history: a loaded block's bias rows), loads [B, Hk, K] int32 (the block entry k of
    block_ids must load into its slot, or -1: a hit or unused; a load's id equals the entry's), and
    the new token: new_k [B, Hk, D], new_v [B, X >= Hk, D] (the values are its last Hk heads: the
    model passes its whole q|k|v projection, whose slice would be a copy before the kernel), new_cis
    [B, Hk], new_row [B, Hk] int32 (its pool row, inside the slot of one entry, or -1: none); and
    count: as `sparse_decode_attention`'s (None, or the carried [B, Hk] int32 zeros)."""
    host_kv: jax.Array
    cis: jax.Array
    loads: jax.Array
    new_k: jax.Array
    new_v: jax.Array
    new_cis: jax.Array
    new_row: jax.Array
    count: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("block_size", "use_bias", "k_splits", "num_warps", "num_stages",
                                             "interpret", "merge"))
def sparse_decode_attention_fetch(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, fetch: Fetch, *,
                                  block_size: int, use_bias: bool = True, k_splits: int | None = None,
                                  num_warps: int = 4, num_stages: int = 2, interpret: bool = False,
                                  merge: str | None = None):
    """`kv_loader.load_blocks` (the misses host -> pool, the new token into its row) and
    `sparse_decode_attention` over the result, in ONE kernel: each entry's block comes from the
    host store if it is a miss (written into its slot on the way) and from the pool otherwise, so
    the PCIe reads of the misses overlap the attention over the hits instead of preceding it.
    Returns (out [B, Hq, D], k_pool, v_pool, bias_pool, count), the pools updated in place (aliased)
    exactly as load_blocks updates them, and `fetch.count` after the call (all zero; None if None).
    bias_pool is always written; use_bias: whether it enters the logits (False: the infllmv2 mode).
    Triton backend only; arguments as `sparse_decode_attention`."""
    _check_merge(merge)
    check_args(q, k_pool, v_pool, bias_pool, block_ids, slots, block_size)
    B, Hk, K = block_ids.shape
    hkv = fetch.host_kv
    want = (k_pool.shape[0], B, Hk, "NB", 2, block_size, q.shape[-1])
    if (hkv.ndim != 7 or hkv.shape[:3] != want[:3] or hkv.shape[4:] != want[4:]
            or hkv.dtype != k_pool.dtype):
        raise ValueError(f"host_kv {hkv.shape} {hkv.dtype} must be {list(want)} {k_pool.dtype}")
    if fetch.cis.ndim != 4 or fetch.cis.shape[:2] != want[:2] or fetch.cis.shape[3] != Hk:
        raise ValueError(f"cis {fetch.cis.shape} must be [{want[0]}, {B}, T, {Hk}]")
    if fetch.loads.shape != (B, Hk, K) or fetch.new_row.shape != (B, Hk) or fetch.new_cis.shape != (B, Hk):
        raise ValueError(f"loads {fetch.loads.shape} / new_row {fetch.new_row.shape} / new_cis {fetch.new_cis.shape} "
                         f"must be {(B, Hk, K)} / {(B, Hk)} / {(B, Hk)}")
    nk, nv = fetch.new_k.shape, fetch.new_v.shape
    if nk != (B, Hk, q.shape[-1]) or len(nv) != 3 or nv[0] != B or nv[1] < Hk or nv[2] != q.shape[-1]:
        raise ValueError(f"new_k {nk} / new_v {nv} must be {(B, Hk, q.shape[-1])} / [{B}, >= {Hk}, {q.shape[-1]}]")
    _check_count(fetch.count, B, Hk)
    if bias_pool is None or K == 0:
        raise ValueError("the fetching kernel needs the bias pool (it writes the loaded blocks' scores) and K > 0")
    f = fetch._replace(loads=fetch.loads.astype(jnp.int32), new_row=fetch.new_row.astype(jnp.int32),
                       new_k=fetch.new_k.astype(k_pool.dtype), new_v=fetch.new_v.astype(v_pool.dtype),
                       new_cis=fetch.new_cis.astype(bias_pool.dtype))
    return _triton_decode(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, f, f.count,
                          add_bias=use_bias, block_size=block_size, k_splits=k_splits, num_warps=num_warps,
                          num_stages=num_stages, interpret=interpret, merge=merge)


def _triton_decode(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, fetch: Fetch | None,
                   count: jax.Array | None, *, add_bias: bool, block_size: int, k_splits, num_warps: int,
                   num_stages: int, interpret: bool, merge: str | None) -> list:
    """The Triton kernel's call; returns [out, count] or, with `fetch`, [out, k_pool, v_pool,
    bias_pool, count] (count: the carried counter after the call, or None if none was given)."""
    B, Hq, D, Hk, K = check_args(q, k_pool, v_pool, bias_pool, block_ids, slots, block_size)
    G = Hq // Hk
    Gp = max(16, next_pow2(G))
    if not interpret:
        _check_gpu_shapes(block_size, D, Gp)

    ks, per = plan_splits(B, Hk, K, k_splits)
    ids = block_ids.astype(jnp.int32)
    sl = slots.astype(jnp.int32)
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    qpos = jnp.asarray(q_pos, jnp.int32).reshape(B)

    has_bias = bias_pool is not None
    normalize = ks == 1
    merge = merge or DEFAULT_MERGE
    if merge == "auto":
        merge = "kernel" if ks <= KERNEL_MERGE_MAX_SPLITS else "jnp"
    in_kernel = not normalize and merge == "kernel"
    kernel = functools.partial(_decode_kernel, block_size=block_size, per_split=per, num_entries=K,
                               scale=1.0 / math.sqrt(D), has_bias=has_bias, add_bias=add_bias, fetch=fetch is not None,
                               group=G, Gp=Gp, normalize=normalize, merge_splits_here=ks if in_kernel else 0,
                               gpu=not interpret)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    args = [layer_arr, qpos, ids, sl, q, k_pool, v_pool] + ([bias_pool] if has_bias else [])
    if fetch is not None:
        args += [fetch.loads, fetch.new_row, fetch.new_k, fetch.new_v, fetch.new_cis, fetch.host_kv, fetch.cis]
    partial_shape = [jax.ShapeDtypeStruct((B, Hk, ks, Gp, D), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hk, ks, Gp), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hk, ks, Gp), jnp.float32)]
    aliases = {}
    if normalize:
        out_shape = [jax.ShapeDtypeStruct((B, Hk, Gp, D), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0))]
    elif in_kernel:  # final output, partials (read back by the last program: whole arrays), counter
        aliases = {len(args): 4}
        args.append(jnp.zeros((B, Hk), jnp.int32) if count is None else count)  # the caller's, or a fresh one
        out_shape = [jax.ShapeDtypeStruct((B, Hq, D), q.dtype), *partial_shape,
                     jax.ShapeDtypeStruct((B, Hk), jnp.int32)]
        out_specs = [any_spec] * 5
    else:
        out_shape = partial_shape
        out_specs = [pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (b, h, s, 0, 0)),
                     pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0)),
                     pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))]
    n_main = len(out_shape)
    if fetch is not None:  # the pools, written in place: outputs aliased to operands 5, 6, 7
        aliases.update({5: n_main, 6: n_main + 1, 7: n_main + 2})
        out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_pool, v_pool, bias_pool)]
        out_specs += [any_spec] * 3
    res = pl.pallas_call(
        kernel,
        grid=(B, Hk, ks),
        in_specs=[any_spec] * len(args),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name="nosa_sparse_decode_fetch" if fetch is not None else "nosa_sparse_decode",
    )(*args)
    main, pools = res[:n_main], list(res[n_main:])

    if normalize:
        out = main[0][:, :, :G].reshape(B, Hq, D)
    elif in_kernel:
        out = main[0]
    else:  # merge the splits (only the G real rows; the padding rows were never written)
        out = merge_splits(*main, G, q.dtype)
    return [out] + pools + [main[4] if in_kernel and count is not None else count]


@functools.partial(jax.jit, static_argnames=("block_size",))
def sparse_decode_attention_reference(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, *,
                                      block_size: int) -> jax.Array:
    """Plain-jnp reference with the kernel's interface (gathers only the selected tokens).

    Equals `nosa.gathered_block_attention(q, q_pos, k_pool[layer], v_pool[layer], bias_pool[layer],
    block_ids, block_size)` when slots == block_ids.
    """
    B, Hq, D = q.shape
    T, Hk = k_pool.shape[2], k_pool.shape[3]
    G = Hq // Hk
    K = block_ids.shape[-1]
    i = jnp.arange(block_size, dtype=jnp.int32)
    pos = block_ids[..., None] * block_size + i  # [B, Hk, K, bs] logical positions
    valid = (block_ids[..., None] >= 0) & (pos <= jnp.asarray(q_pos, jnp.int32)[:, None, None, None])
    phys = jnp.where(block_ids >= 0, slots, 0)[..., None] * block_size + i
    phys = jnp.clip(phys, 0, T - 1).reshape(B, Hk, K * block_size)
    valid = valid.reshape(B, Hk, K * block_size)
    lyr = jnp.asarray(layer, jnp.int32)
    b_idx = jnp.arange(B)[:, None, None]
    h_idx = jnp.arange(Hk)[None, :, None]
    # Invisible tokens (tail of the query's block, -1 entries) are zeroed so that whatever the pool
    # holds there (garbage, NaN) cannot reach the output, as in the kernel's masked loads.
    kg = jnp.where(valid[..., None], k_pool[lyr, b_idx, phys, h_idx].astype(jnp.float32), 0.0)  # [B, Hk, N, D]
    vg = jnp.where(valid[..., None], v_pool[lyr, b_idx, phys, h_idx].astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(B, Hk, G, D)
    s = jnp.einsum("bhgd,bhnd->bhgn", qg, kg, precision=lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(D))
    if bias_pool is not None:
        bias = jnp.where(valid, bias_pool[lyr, b_idx, phys, h_idx].astype(jnp.float32), 0.0)
        s = s + bias[:, :, None, :]
    s = jnp.where(valid[:, :, None], s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid[:, :, None], jnp.exp(s - m), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(z > 0, z, 1.0)
    o = jnp.einsum("bhgn,bhnd->bhgd", p, vg, precision=lax.Precision.HIGHEST)
    return o.reshape(B, Hq, D).astype(q.dtype)
