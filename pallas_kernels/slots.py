"""The offloaded decode step's slot assignment in one Pallas Triton kernel (`update_slots`).

`nosa_jax.offload.assign_slots` places one layer's selected blocks in the device pool: hits keep
their slot, misses take the slots that hold no selected block (empty ones first, lowest slot first,
then the least recently selected), and the layer's slot table and LRU stamps are updated. In XLA
that is eight tiny kernels per layer (compares, an argsort of the S slots, scatters back into the
stacked table) plus the `live` selects: ~14 us per layer on the H200 at 8B, batch 16 (the "slots"
part of the offloaded step split, bench/NOTES.md), and about five more for the step's locality
statistics (misses, reused, selected, the previous selection; `_store_stats` here). Here one
program per (sequence, kv head) does it all in registers, and reads and writes the stacked
[L, B, Hk, S] table and stamps and the [L, B, Hk(, K)] statistics in place (aliased, the layer
index read in-kernel):

  match[k, s]   table[s] == ids[k] for valid ids (>= 0)           [K, S] compare
  hit slot      the lowest matching s (argmax of match)             min over s
  held[s]       some selected block sits in slot s                  max over k
  prio[s]       held: INT32_MAX; empty (-1): -1; else its stamp
  evict rank    slots in (prio, slot) order - the stable argsort's inverse - as a count of the
                slots before each one                               [S, S] compare + sum
  miss rank     inclusive cumsum of the misses - 1; a miss takes the slot whose evict rank equals
                its miss rank (clipped to S - 1, as the XLA version's take_along_axis)
  new rows      slot s gets the id assigned to it (at most one: K <= S and hits and misses take
                distinct slots) and the stamp `now`; only for live sequences, whose loads are
                kept (stopped sequences: loads -1, table and stamps unchanged)

Integers only, so the result is exactly assign_slots' (tests/test_slots.py). K and S are padded
to powers of two with masked loads (padded ids -1, padded slots held: never chosen, never stored).

Pools of more than RANK_MAX_SLOTS slots (the "fit" pools of long contexts: 1024 slots at 128K) do not
fit the [S, S] and [K, S] compares in registers; the kernel then keeps [S] rows and [T, S]
tiles of T ids (8192 lanes): each tile finds its ids' slots with one reduction over the row, a loop
over the misses alone takes the next victim (the lowest (priority, slot): two mins over the row per
miss), and each tile places its ids with a reduction over its T rows. Steady-state steps have few
misses. Rows of up to MAX_LANES_LARGE slots; above that, assign_slots in XLA. (The first version
looped over the K ids one at a time: 18 us per layer at 1024 slots, batch 27, on the H200 - 0.58 ms
of a 12.8 ms step, bench/results/throughput-8b-s8-fit-slots-2026-12-04; the tiles: 13.8 us per
layer in the same model, 0.44 ms per 11.95 ms step, bench/results/throughput-8b-s9-fit-2026-12-04.)
`SLOTS_IMPL` picks the default: "pallas". Measured in the offloaded step (H200, 8B, batch 16, 16K,
pool 2x top-k, same misses and gamma; bench/results/throughput-8b-s7-slots-{xla,pallas}-2026-12-04):
10.04 ms per step (1594 tok/s) against 10.82 ms (1479 tok/s) with the XLA version, 1.08x.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lanes import next_pow2

SLOTS_IMPL = "pallas"
# Where the offloaded step finds the new token's pool row (the slot of the block holding position
# `start`, times block_size, plus its offset; -1 for a stopped sequence): "kernel" (update_slots'
# ninth output, given block_size; the attention then takes the kernel's slots unclamped, since it
# clamps the entries it masks itself) or "xla" (decode_attend's own fusions: a max over the K
# entries, and the slots clamped to >= 0).
ROWS = "kernel"
MAX_LANES = 256  # at most this many selected ids per row (padded)
# Rows of up to this many (padded) slots rank the victims with an [S, S] compare; longer rows take
# the tiled path. On the H200 (batch 248, 4 misses per row, bench/results/probe-slots-s10-*) the
# [256, 256] rank took 53-60 us per layer call where the tiles took 32-42 (167 and 256 slots); at
# 128 slots the rank path is the faster one.
RANK_MAX_SLOTS = 128
MAX_LANES_LARGE = 8192  # longer rows, in tiles, up to this many slots (512K tokens)
# Triton warps per (sequence, kv head) program: "auto" is 8 (both paths); "4", "8" or "16" force a
# count (the benchmarks' `slots_warps` choice). The [S, S] rank path ran at 4 warps until session 27:
# at 128 slots its [128, 128] compare held 128 values per thread. 8B / 16K / batch 16, pool 2x
# top-k, in-process rotated A/B on an H100 (bench/results/throughput-s27-ab*-8b-h100.log): 8 warps
# x0.982 (5 rounds) and x0.984 (11 rounds) of the step time against 4; 16 warps x0.991.
WARPS = "auto"
_BIG = int(jnp.iinfo(jnp.int32).max)



def _store_stats(prev_in, prev_ref, misses_ref, reused_ref, selected_ref, layer, b, h, ids, miss, live, k_in, Kp):
    """This (sequence, head)'s locality statistics, counted as decode_attend's XLA path does: misses
    (loads of a live sequence), reused (selected ids the previous step selected too) and selected,
    both 0 for a stopped sequence; the selection becomes the previous one only while live."""
    prev = pltriton.load(prev_in.at[layer, b, h, pl.ds(0, Kp)], mask=k_in, other=-1 if k_in is not None else None)
    valid = ids >= 0
    again = jnp.max(jnp.where((ids[:, None] == prev[None, :]) & valid[:, None], 1, 0), axis=1)
    at = pl.ds(h, 1)

    def put(ref, count):  # 0 for a stopped sequence
        pltriton.store(ref.at[layer, b, at], jnp.full((1,), jnp.where(live, count, 0), jnp.int32))

    put(misses_ref, jnp.sum(jnp.where(miss, 1, 0)))
    put(reused_ref, jnp.sum(again))
    put(selected_ref, jnp.sum(jnp.where(valid, 1, 0)))
    keep = jnp.broadcast_to(live, (Kp,))
    pltriton.store(prev_ref.at[layer, b, h, pl.ds(0, Kp)], ids, mask=keep if k_in is None else keep & k_in)


def _slots_kernel(layer_ref, now_ref, live_ref, ids_ref, *refs, K: int, S: int, Kp: int, Sp: int, block_size: int):
    """One (sequence b, kv head h); the *_in refs and their outputs are the same buffers (aliased):
    read the layer's rows, then store the slots that change. Rows of up to RANK_MAX_SLOTS slots compare
    all K ids at once and rank the victims with an [S, S] compare; longer rows take the ids in tiles
    and the victims one miss at a time (module docstring). With block_size, refs start with the
    positions [B] and end with the new token's rows [B, Hk]."""
    if block_size:
        start_ref, *refs, rows_ref = refs
    (table_in, stamp_in, prev_in, _mi, _ri, _si, slots_ref, loads_ref, table_ref, stamp_ref, prev_ref, misses_ref,
     reused_ref, selected_ref) = refs
    b = pl.program_id(0)
    h = pl.program_id(1)
    layer = layer_ref[0]
    now = now_ref[b]
    live = live_ref[b] != 0
    kk = lax.broadcasted_iota(jnp.int32, (Kp,), 0)
    ss = lax.broadcasted_iota(jnp.int32, (Sp,), 0)
    k_in = kk < K if K < Kp else None
    s_in = ss < S if S < Sp else None
    ids = pltriton.load(ids_ref.at[b, h, pl.ds(0, Kp)], mask=k_in, other=-1 if k_in is not None else None)
    table = pltriton.load(table_in.at[layer, b, h, pl.ds(0, Sp)], mask=s_in, other=-2 if s_in is not None else None)
    stamp = pltriton.load(stamp_in.at[layer, b, h, pl.ds(0, Sp)], mask=s_in, other=0 if s_in is not None else None)
    large = Sp > RANK_MAX_SLOTS
    T = _tile_ids(Sp) if large else Kp
    jj = lax.broadcasted_iota(jnp.int32, (T,), 0)

    def pick(t, row):  # lanes t*T .. t*T + T - 1 of a [Kp] row, as a [T] tile
        if T == Kp:
            return row
        return jnp.sum(jnp.where(kk[None, :] == (t * T + jj)[:, None], row[None, :], 0), axis=1)

    def spread(t, part):  # a [T] tile's values at their lanes of a [Kp] row (0 elsewhere)
        if T == Kp:
            return part
        return jnp.sum(jnp.where(kk[:, None] == (t * T + jj)[None, :], part[None, :], 0), axis=1)

    # hits: each tile of T ids against the whole row at once, one reduction over the row per tile
    held = jnp.zeros((Sp,), jnp.int32)
    hit_slot = jnp.zeros((Kp,), jnp.int32)
    for t in range(Kp // T):
        ids_t = pick(t, ids)
        match = (table[None, :] == ids_t[:, None]) & (ids_t[:, None] >= 0)  # [T, Sp]
        hit_slot += spread(t, jnp.min(jnp.where(match, ss[None, :], Sp), axis=1))
        held = held | jnp.max(jnp.where(match, 1, 0), axis=0)
    valid = ids >= 0
    hit = hit_slot < Sp
    miss = valid & ~hit
    held = held > 0
    if s_in is not None:
        held = held | ~s_in  # padding slots: never chosen
    prio = jnp.where(held, _BIG, jnp.where(table < 0, -1, stamp))
    one = jnp.where(miss, 1, 0)
    miss_rank = lax.cumsum(one, axis=0) - 1
    if large:
        def evict(i, carry):  # miss number i takes the lowest (priority, slot) not yet taken
            prio, miss_slot = carry
            low = jnp.min(prio)
            victim = jnp.min(jnp.where(prio == low, ss, Sp))
            return jnp.where(ss == victim, _BIG, prio), jnp.where(miss & (miss_rank == i), victim, miss_slot)

        _, miss_slot = lax.fori_loop(0, jnp.sum(one), evict, (prio, jnp.full((Kp,), -1, jnp.int32)))
    else:  # every slot's place in (priority, slot) order; miss number i takes the slot of place i
        me = lax.broadcasted_iota(jnp.int32, (Sp, Sp), 0)
        other = lax.broadcasted_iota(jnp.int32, (Sp, Sp), 1)
        before = (prio[None, :] < prio[:, None]) | ((prio[None, :] == prio[:, None]) & (other < me))
        evict_rank = jnp.sum(jnp.where(before, 1, 0), axis=1)
        s_of = lax.broadcasted_iota(jnp.int32, (Kp, Sp), 1)
        miss_slot = jnp.sum(jnp.where(evict_rank[None, :] == jnp.clip(miss_rank, 0, S - 1)[:, None], s_of, 0), axis=1)
    slots = jnp.where(hit, hit_slot, jnp.where(miss, miss_slot, -1))
    loads = jnp.where(miss & live, ids, -1)
    pltriton.store(slots_ref.at[b, h, pl.ds(0, Kp)], slots, mask=k_in)
    pltriton.store(loads_ref.at[b, h, pl.ds(0, Kp)], loads, mask=k_in)
    if block_size:  # the new token's row: the slot of its block (selected while live: forced local)
        pos = start_ref[b]
        own = jnp.max(jnp.where(ids == pos // block_size, slots, -1))
        row = jnp.where(live & (own >= 0), own * block_size + pos % block_size, -1)
        pltriton.store(rows_ref.at[b, pl.ds(h, 1)], jnp.full((1,), row, jnp.int32))
    _store_stats(prev_in, prev_ref, misses_ref, reused_ref, selected_ref, layer, b, h, ids, miss, live, k_in, Kp)

    # every selected id lands in its slot (hits rewrite their own id) with the stamp `now`
    new_id, written = table, jnp.zeros((Sp,), jnp.int32)
    for t in range(Kp // T):
        ids_t, slots_t = pick(t, ids), pick(t, slots)
        assign = (slots_t[:, None] == ss[None, :]) & (ids_t[:, None] >= 0)  # [T, Sp]: at most one per slot
        put = jnp.max(jnp.where(assign, ids_t[:, None], -1), axis=0)
        new_id = jnp.where(put >= 0, put, new_id)
        written = written | jnp.where(put >= 0, 1, 0)
    written = (written > 0) & live
    pltriton.store(table_ref.at[layer, b, h, pl.ds(0, Sp)], new_id, mask=written)
    pltriton.store(stamp_ref.at[layer, b, h, pl.ds(0, Sp)], jnp.broadcast_to(now, (Sp,)), mask=written)


def _warps() -> int:
    if WARPS == "auto":
        return 8
    if WARPS not in ("4", "8", "16"):
        raise ValueError(f"slots.WARPS must be 'auto', '4', '8' or '16', got {WARPS!r}")
    return int(WARPS)


def _tile_ids(Sp: int) -> int:
    """Ids per tile of the long-row kernel: [T, Sp] compares of 8192 lanes (32 per thread at 8 warps)."""
    return max(1, min(16, 8192 // Sp))


def _lanes(S: int, K: int) -> tuple[int, int]:
    return next_pow2(max(K, 16)), next_pow2(max(S, 16))


def supported(S: int, K: int) -> bool:
    """Whether rows of S pool slots and K selected blocks fit a kernel (else use assign_slots)."""
    Kp, Sp = _lanes(S, K)
    return Kp <= MAX_LANES and Sp <= MAX_LANES_LARGE


def update_slots(table: jax.Array, stamp: jax.Array, prev_ids: jax.Array, misses: jax.Array, reused: jax.Array,
                 selected: jax.Array, layer, ids: jax.Array, now: jax.Array, live: jax.Array, *,
                 start: jax.Array | None = None, block_size: int | None = None, interpret: bool = False):
    """One layer's slot assignment and locality statistics on the stacked arrays, in place.

    table, stamp: [L, B, Hk, S] int32 (block id held by each slot or -1; last selection step);
    prev_ids: [L, B, Hk, K] the previous step's selection; misses, reused, selected: [L, B, Hk]
    int32 counts; layer: traced int; ids: [B, Hk, K] int32 selected block ids (-1 unused); now: [B]
    LRU clock; live: [B] bool, sequences still decoding. Returns (slots [B, Hk, K], loads [B, Hk, K],
    table, stamp, prev_ids, misses, reused, selected): slots, loads, table and stamp equal to
    `nosa_jax.offload.assign_slots` on layer `layer`, with loads -1 and the layer's rows unchanged for
    sequences that are not live; the statistics as `decode_attend` counts them. With block_size (and
    start [B], the new token's positions) a ninth output, rows [B, Hk]: the pool row of the token at
    `start` (its block's slot * block_size + start % block_size), -1 where the sequence is not live
    or its block is not selected.
    """
    L, B, Hk, S = table.shape
    K = ids.shape[-1]
    Kp, Sp = _lanes(S, K)
    if not supported(S, K):
        raise ValueError(f"update_slots: K={K} must be <= {MAX_LANES} and S={S} <= {MAX_LANES_LARGE} "
                         f"(use nosa_jax.offload.assign_slots)")
    if (start is None) != (block_size is None):
        raise ValueError("update_slots: pass start and block_size together (the new token's rows), or neither")
    state = (table, stamp, prev_ids, misses, reused, selected)
    head = [jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(now, jnp.int32), jnp.asarray(live, jnp.int32),
            ids.astype(jnp.int32)] + ([jnp.asarray(start, jnp.int32)] if block_size else [])
    args = head + list(state)
    rows_shape = [jax.ShapeDtypeStruct((B, Hk), jnp.int32)] if block_size else []
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_slots_kernel, K=K, S=S, Kp=Kp, Sp=Sp, block_size=block_size or 0),
        grid=(B, Hk),
        in_specs=[any_spec] * len(args),
        out_specs=[any_spec] * (8 + len(rows_shape)),
        out_shape=[jax.ShapeDtypeStruct((B, Hk, K), jnp.int32)] * 2
                  + [jax.ShapeDtypeStruct(x.shape, jnp.int32) for x in state] + rows_shape,
        input_output_aliases={len(head) + i: 2 + i for i in range(len(state))},
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=_warps(), num_stages=1),
        interpret=interpret,
        name="nosa_update_slots",
    )(*args)
    return tuple(out)
