"""The offloaded decode step's slot assignment in one Pallas Triton kernel (`update_slots`).

`nosa_jax.offload.assign_slots` places one layer's selected blocks in the device pool: hits keep
their slot, misses take the slots that hold no selected block (empty ones first, lowest slot first,
then the least recently selected), and the layer's slot table and LRU stamps are updated. In XLA
that is eight tiny kernels per layer (compares, an argsort of the S slots, scatters back into the
stacked table) plus the `live` selects: ~14 us per layer on the H200 at 8B, batch 16 (the "slots"
part of the offloaded step split, bench/NOTES.md). Here one program per (sequence, kv head) does
it all in registers, and reads and writes the stacked [L, B, Hk, S] table and stamps in place
(aliased, the layer index read in-kernel):

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

Pools of more than MAX_LANES slots (the "fit" pools of long contexts: 1024 slots at 128K) do not
fit the [S, S] and [K, S] compares in registers; `_slots_kernel_large` keeps only [S] rows: a loop
over the K selected ids finds each one's slot (one compare and min over the row per id), and a loop
over the misses alone takes the next victim (the lowest (priority, slot): two mins over the row per
miss). Steady-state steps have few misses, so its cost is ~K row reductions. Rows of up to
MAX_LANES_LARGE slots; above that, assign_slots in XLA.
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

SLOTS_IMPL = "pallas"
MAX_LANES = 256  # the all-at-once kernel's rows
MAX_LANES_LARGE = 8192  # the looping kernel's rows (pools of up to 8192 slots: 512K tokens)
_BIG = int(jnp.iinfo(jnp.int32).max)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rows(layer_ref, now_ref, live_ref, ids_ref, table_in, stamp_in, K, S, Kp, Sp):
    """Both kernels' start: this program's (sequence, head), layer, clock and live flag, the lane
    indices and masks of the padded rows, and the selected ids, slot table and stamps."""
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
    return b, h, layer, now, live, kk, ss, k_in, s_in, ids, table, stamp


def _slots_kernel(layer_ref, now_ref, live_ref, ids_ref, table_in, stamp_in, slots_ref, loads_ref, table_ref,
                  stamp_ref, *, K: int, S: int, Kp: int, Sp: int):
    """One (sequence b, kv head h); table_in / stamp_in and table_ref / stamp_ref are the same
    buffers (aliased): read the layer's rows, then store the slots that change."""
    b, h, layer, now, live, kk, ss, k_in, s_in, ids, table, stamp = _rows(layer_ref, now_ref, live_ref, ids_ref,
                                                                          table_in, stamp_in, K, S, Kp, Sp)

    valid = ids >= 0
    s_of = lax.broadcasted_iota(jnp.int32, (Kp, Sp), 1)
    match = (table[None, :] == ids[:, None]) & valid[:, None]
    hit_slot = jnp.min(jnp.where(match, s_of, Sp), axis=1)
    hit = hit_slot < Sp
    miss = valid & ~hit
    held = jnp.max(jnp.where(match, 1, 0), axis=0) > 0
    if s_in is not None:
        held = held | ~s_in  # padding slots: never chosen
    prio = jnp.where(held, _BIG, jnp.where(table < 0, -1, stamp))
    me = lax.broadcasted_iota(jnp.int32, (Sp, Sp), 0)
    other = lax.broadcasted_iota(jnp.int32, (Sp, Sp), 1)
    before = (prio[None, :] < prio[:, None]) | ((prio[None, :] == prio[:, None]) & (other < me))
    evict_rank = jnp.sum(jnp.where(before, 1, 0), axis=1)
    one = jnp.where(miss, 1, 0)
    miss_rank = jnp.clip(lax.cumsum(one, axis=0) - 1, 0, S - 1)
    miss_slot = jnp.sum(jnp.where(evict_rank[None, :] == miss_rank[:, None], s_of, 0), axis=1)
    slots = jnp.where(hit, hit_slot, jnp.where(miss, miss_slot, -1))
    loads = jnp.where(miss & live, ids, -1)
    pltriton.store(slots_ref.at[b, h, pl.ds(0, Kp)], slots, mask=k_in)
    pltriton.store(loads_ref.at[b, h, pl.ds(0, Kp)], loads, mask=k_in)

    assign = (slots[:, None] == s_of) & valid[:, None]
    written = (jnp.max(jnp.where(assign, 1, 0), axis=0) > 0) & live
    new_id = jnp.max(jnp.where(assign, ids[:, None], -1), axis=0)
    pltriton.store(table_ref.at[layer, b, h, pl.ds(0, Sp)], new_id, mask=written)
    pltriton.store(stamp_ref.at[layer, b, h, pl.ds(0, Sp)], jnp.broadcast_to(now, (Sp,)), mask=written)


def _slots_kernel_large(layer_ref, now_ref, live_ref, ids_ref, table_in, stamp_in, slots_ref, loads_ref, table_ref,
                        stamp_ref, *, K: int, S: int, Kp: int, Sp: int):
    """`_slots_kernel` for long pool rows: no [K, S] or [S, S] intermediates (see the module
    docstring); the same result."""
    b, h, layer, now, live, kk, ss, k_in, s_in, ids, table, stamp = _rows(layer_ref, now_ref, live_ref, ids_ref,
                                                                          table_in, stamp_in, K, S, Kp, Sp)

    def find(k, carry):  # selected id k: its (lowest) slot in the row, the slots holding it
        held, hit_slot = carry
        idk = ids_ref[b, h, k]
        match = (table == idk) & (idk >= 0)
        slot = jnp.min(jnp.where(match, ss, Sp))
        return held | jnp.where(match, 1, 0), jnp.where(kk == k, slot, hit_slot)

    held, hit_slot = lax.fori_loop(0, K, find, (jnp.zeros((Sp,), jnp.int32), jnp.full((Kp,), Sp, jnp.int32)))
    valid = ids >= 0
    hit = hit_slot < Sp
    miss = valid & ~hit
    held = held > 0
    if s_in is not None:
        held = held | ~s_in  # padding slots: never chosen
    prio = jnp.where(held, _BIG, jnp.where(table < 0, -1, stamp))
    one = jnp.where(miss, 1, 0)
    miss_rank = lax.cumsum(one, axis=0) - 1
    n_miss = jnp.sum(one)

    def evict(i, carry):  # miss number i takes the lowest (priority, slot) not yet taken
        prio, miss_slot = carry
        low = jnp.min(prio)
        victim = jnp.min(jnp.where(prio == low, ss, Sp))
        return jnp.where(ss == victim, _BIG, prio), jnp.where(miss & (miss_rank == i), victim, miss_slot)

    _, miss_slot = lax.fori_loop(0, n_miss, evict, (prio, jnp.full((Kp,), -1, jnp.int32)))
    slots = jnp.where(hit, hit_slot, jnp.where(miss, miss_slot, -1))
    loads = jnp.where(miss & live, ids, -1)
    pltriton.store(slots_ref.at[b, h, pl.ds(0, Kp)], slots, mask=k_in)
    pltriton.store(loads_ref.at[b, h, pl.ds(0, Kp)], loads, mask=k_in)

    # every selected id lands in its slot (hits rewrite their own id) with the stamp `now`
    def place(k, carry):
        new_id, written = carry
        slot = jnp.sum(jnp.where(kk == k, slots, 0))
        idk = ids_ref[b, h, k]
        at = (ss == slot) & (idk >= 0)
        return jnp.where(at, idk, new_id), written | jnp.where(at, 1, 0)

    new_id, written = lax.fori_loop(0, K, place, (table, jnp.zeros((Sp,), jnp.int32)))
    written = (written > 0) & live
    pltriton.store(table_ref.at[layer, b, h, pl.ds(0, Sp)], new_id, mask=written)
    pltriton.store(stamp_ref.at[layer, b, h, pl.ds(0, Sp)], jnp.broadcast_to(now, (Sp,)), mask=written)


def _lanes(S: int, K: int) -> tuple[int, int]:
    return _next_pow2(max(K, 16)), _next_pow2(max(S, 16))


def supported(S: int, K: int) -> bool:
    """Whether rows of S pool slots and K selected blocks fit a kernel (else use assign_slots)."""
    Kp, Sp = _lanes(S, K)
    return Kp <= MAX_LANES and Sp <= MAX_LANES_LARGE


def update_slots(table: jax.Array, stamp: jax.Array, layer, ids: jax.Array, now: jax.Array, live: jax.Array, *,
                 interpret: bool = False):
    """One layer's slot assignment on the stacked tables, in place.

    table, stamp: [L, B, Hk, S] int32 (block id held by each slot or -1; last selection step);
    layer: traced int; ids: [B, Hk, K] int32 selected block ids (-1 unused); now: [B] LRU clock;
    live: [B] bool, sequences still decoding. Returns (slots [B, Hk, K], loads [B, Hk, K], table,
    stamp) equal to `nosa_jax.offload.assign_slots` on layer `layer`, with loads -1 and the layer's
    rows unchanged for sequences that are not live.
    """
    L, B, Hk, S = table.shape
    K = ids.shape[-1]
    Kp, Sp = _lanes(S, K)
    if not supported(S, K):
        raise ValueError(f"update_slots: K={K} must be <= {MAX_LANES} and S={S} <= {MAX_LANES_LARGE} "
                         f"(use nosa_jax.offload.assign_slots)")
    large = Sp > MAX_LANES
    args = [jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(now, jnp.int32), jnp.asarray(live, jnp.int32),
            ids.astype(jnp.int32), table, stamp]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_slots_kernel_large if large else _slots_kernel, K=K, S=S, Kp=Kp, Sp=Sp),
        grid=(B, Hk),
        in_specs=[any_spec] * len(args),
        out_specs=[any_spec] * 4,
        out_shape=[jax.ShapeDtypeStruct((B, Hk, K), jnp.int32)] * 2
                  + [jax.ShapeDtypeStruct(table.shape, jnp.int32)] * 2,
        input_output_aliases={4: 2, 5: 3},
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=8 if Sp > 1024 else 4,
                                                                        num_stages=1),
        interpret=interpret,
        name="nosa_update_slots",
    )(*args)
    return tuple(out)
