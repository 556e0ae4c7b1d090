"""Host-offloaded KV cache (NOSI in JAX): the full K/V history in pinned host memory, a pool of
block slots on the device, and per-step loads of only the blocks the selection newly needs.

Layout (L layers, B sequences, Hk kv heads, NB blocks of bs tokens, S pool slots, D head dim):
  host_kv         [L, B, Hk, NB + F, 2, bs, D]  model dtype, pinned host: K (index 0) and V (1) of
                                         each (layer, sequence, head, block) in one contiguous
                                         chunk, the whole store one allocation (pinned_pool_reservation:
                                         XLA's pinned pool places one array whenever it fits, two
                                         equal ones need next_pow2(X) + X); F = flush_blocks spare
                                         blocks so a flush window never runs past the end
  pool_k, pool_v  [L, B, S*bs, Hk, D]    device: slot s of head h = rows s*bs .. s*bs+bs-1, the
                                         layout the decode kernel reads (`slots` index it)
  pool_bias       [L, B, S*bs, Hk]       float32 device copy of the slot tokens' eviction scores
  table           [L, B, Hk, S]          int32 block id held by each slot (-1: empty)
  stamp           [L, B, Hk, S]          int32 length of the sequence when the slot was last selected
  ring_k          [L, B, R, Hk, D]       the last R keys per sequence (position p at p % R): the
                                         compressed window a new token completes is averaged from
                                         here, in the same order as the on-device cache does
  cis, ktilde, cisw, length, rope_len    as in `KVCache` (small; they stay on the device)
  flushed         [B]                    tokens per sequence already written to the host store
  prev_ids        [L, B, Hk, K]          last step's selection (locality statistics)
  misses, reused, selected [L, B, Hk]    this step's counts (statistics)
  merge_count     [B, Hk]                int32, always zero between calls: the fetching kernel's
                                         split counter (`sparse_decode.Fetch.count`), carried
                                         through the layers and steps so that no step zeroes one

One decode step, per layer (all inside the jitted decode loop, no host round trip):
  1. the new token's key goes to the ring, its cis to the device history; the window it completes
     (if any) is averaged;
  2. the selection runs on the device exactly as in the on-device cache;
  3. slots: selected blocks already in the pool are hits; each miss takes a slot not holding a
     selected block, empty slots first, then the least recently selected (LRU); the tail block
     (the token's own, always among the forced local blocks) is therefore always resident;
  4. the misses are copied host -> pool (`pallas_kernels.kv_loader.load_blocks`), and the new
     token is written into its block's slot (so the current token always sees its own block);
  5. attention over the pool through the slot table (the same decode kernel / reference).
     With the Pallas model on the zero-copy loader path, 4 and 5 are one kernel
     (`sparse_decode.sparse_decode_attention_fetch`, chosen by LOADS): each miss is read from the
     pinned store by the program that attends to it, so the PCIe reads overlap the attention.
A pool of exactly top-k slots is upstream's behaviour; more slots keep blocks that drop out of
the selection resident (a victim cache), so they come back without a load.

New tokens reach the host store in batches (`flush`), not per step: a block stays among the forced
local blocks - hence selected, hence resident - for local_blocks * block_size steps after its
first token, so the decode loop writes the blocks touched since the last flush from the pool to
the host every `flush_interval` (<= local_blocks * block_size) steps and at the end of every call
(one copy per sequence of all layers, heads and those blocks, or one for the batch when its
sequences' windows start at the same block), and a block is never loaded before it has been
flushed. This replaces per-step device->host writes of single tokens (one tiny transfer per
sequence and layer every step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.compute_on import compute_on

from . import nosa
from .cache import (DEFAULT_PREFILL_CHUNK, KVCache, allocation, cache_bytes, new_windows,
                    prefill_activation_bytes)
from .config import ModelConfig, NosaConfig

@dataclasses.dataclass
class OffloadedKV:
    host_kv: jax.Array
    pool_k: jax.Array
    pool_v: jax.Array
    pool_bias: jax.Array
    table: jax.Array
    stamp: jax.Array
    ring_k: jax.Array
    cis: jax.Array
    ktilde: jax.Array
    cisw: jax.Array
    length: jax.Array
    rope_len: jax.Array
    flushed: jax.Array
    prev_ids: jax.Array
    misses: jax.Array
    reused: jax.Array
    selected: jax.Array
    merge_count: jax.Array
    capacity: int
    loader: str = "xla"  # kv_loader path: "pallas" (zero-copy kernel) or "xla" (init_offloaded resolves "auto")


_DATA = [f.name for f in dataclasses.fields(OffloadedKV) if f.name not in ("capacity", "loader")]
jax.tree_util.register_dataclass(OffloadedKV, data_fields=_DATA, meta_fields=["capacity", "loader"])


# How the Pallas model's offloaded step loads its misses: "fused" = in the attention kernel
# (`sparse_decode.sparse_decode_attention_fetch`: each miss is read from the pinned store by the
# program that attends to it, so the PCIe reads overlap the attention over the hits), on the
# zero-copy loader path only; "separate" = `kv_loader.load_blocks`, then the attention.
LOADS = "fused"


class OffloadError(ValueError):
    """An offloaded run that cannot be set up (mode, pool size, memory budgets)."""


def ring_size(n: NosaConfig) -> int:
    """Keys kept per sequence for the window means: a power of two covering one window."""
    return 1 << max(0, n.kernel_size - 1).bit_length()


FLUSH_MAX_BLOCKS = 4  # flush at least every 4 blocks' worth of steps (bounds the flush window)


def flush_interval(n: NosaConfig) -> int:
    """Decode steps between flushes: at most local_blocks * block_size (a block stays among the
    forced local blocks, hence resident, that long after its first token), and at most
    FLUSH_MAX_BLOCKS blocks' worth so the window stays small; 1 without local blocks."""
    return min(n.local_blocks, FLUSH_MAX_BLOCKS) * n.block_size if n.local_blocks else 1


def flush_blocks(n: NosaConfig, steps: int | None = None) -> int:
    """Blocks a sequence can touch in `steps` decode steps (default: a flush interval): the flush
    window."""
    steps = flush_interval(n) if steps is None else min(steps, flush_interval(n))
    return -(-steps // n.block_size) + 1


def num_selected(cfg: ModelConfig, capacity: int) -> int:
    """K: selected blocks per (sequence, kv head) at this capacity."""
    T, _ = allocation(cfg, capacity)
    return min(cfg.nosa.topk, T // cfg.nosa.block_size)


def pool_size(cfg: ModelConfig, capacity: int, pool_slots: int | None = None) -> int:
    """Slots per (layer, sequence, kv head): `pool_slots`, or by default twice the top-k (blocks
    that leave the selection stay resident; top-k is upstream's exact fit)."""
    return pool_slots or 2 * num_selected(cfg, capacity)


def offload_shapes(cfg: ModelConfig, batch: int, capacity: int, dtype, mode: str, pool_slots: int):
    """{name: ShapeDtypeStruct} of every array of an OffloadedKV, and which live on the host."""
    if mode not in ("nosa", "infllmv2"):
        raise OffloadError(f"the offloaded cache serves the sparse modes 'nosa' and 'infllmv2', not {mode!r} "
                           f"(full attention reads every block each step: nothing to offload)")
    n = cfg.nosa
    L, Hk, D, bs = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, n.block_size
    T, C = allocation(cfg, capacity)
    NB = T // bs
    K = num_selected(cfg, capacity)
    if pool_slots < K:
        raise OffloadError(f"pool_slots={pool_slots} is smaller than the {K} blocks selected per step; "
                           f"use at least {K} (top-k) slots")
    S, R, F = pool_slots, ring_size(n), flush_blocks(n)
    dt = jnp.dtype(dtype)
    f32, i32 = jnp.float32, jnp.int32
    sd = jax.ShapeDtypeStruct
    shapes = dict(
        host_kv=sd((L, batch, Hk, NB + F, 2, bs, D), dt),
        pool_k=sd((L, batch, S * bs, Hk, D), dt), pool_v=sd((L, batch, S * bs, Hk, D), dt),
        pool_bias=sd((L, batch, S * bs, Hk), f32),  # unused by infllmv2 attention (1/64 of the pool)
        table=sd((L, batch, Hk, S), i32), stamp=sd((L, batch, Hk, S), i32),
        ring_k=sd((L, batch, R, Hk, D), dt),
        cis=sd((L, batch, T, Hk), f32),
        ktilde=sd((L, batch, C, Hk, D), dt if dt.itemsize < 4 else f32),
        cisw=sd((L, batch, C if mode == "nosa" else 0, Hk), f32),
        length=sd((batch,), i32), rope_len=sd((batch,), i32), flushed=sd((batch,), i32),
        prev_ids=sd((L, batch, Hk, K), i32),
        misses=sd((L, batch, Hk), i32), reused=sd((L, batch, Hk), i32), selected=sd((L, batch, Hk), i32),
        merge_count=sd((batch, Hk), i32))
    return shapes, {"host_kv"}


def offload_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype, mode: str, pool_slots: int) -> tuple[int, int]:
    """(device bytes, host bytes) of the offloaded cache."""
    shapes, on_host = offload_shapes(cfg, batch, capacity, dtype, mode, pool_slots)
    size = lambda s: int(math.prod(s.shape)) * s.dtype.itemsize
    return (sum(size(s) for k, s in shapes.items() if k not in on_host),
            sum(size(s) for k, s in shapes.items() if k in on_host))


def prefill_bytes(cfg: ModelConfig, capacity: int, dtype, mode: str, chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """Device bytes to prefill one sequence into the offloaded cache in calls of `chunk` prompt
    tokens: its on-device cache, the calls' activations (`cache.prefill_activation_bytes`), and
    `store_prefill`'s staging copies of its K/V in the host store's block layout, one layer at a
    time; two layers' worth, so that the copy of one may overlap the staging of the next."""
    T, _ = allocation(cfg, capacity)
    layer_kv = 2 * T * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return (cache_bytes(cfg, 1, capacity, dtype, mode)
            + prefill_activation_bytes(cfg, capacity, dtype, mode, chunk) + 2 * layer_kv)


def fit_pool_slots(cfg: ModelConfig, batch: int, capacity: int, dtype, mode: str, budget: int,
                   chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """The largest pool (slots per (layer, sequence, kv head), from top-k up to every block of the
    capacity) whose offloaded device state for `batch` sequences plus one sequence's prefill in
    calls of `chunk` tokens (`prefill_bytes`) fits `budget` bytes: the device memory a dense cache
    would take goes to the pool, where it turns misses into hits. top-k when not even that fits
    (the generator's memory check says so)."""
    K = num_selected(cfg, capacity)
    room = budget - prefill_bytes(cfg, capacity, dtype, mode, chunk)
    lo, hi = K, max(K, -(-capacity // cfg.nosa.block_size))
    while lo < hi:  # device bytes grow with the pool: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if offload_bytes(cfg, batch, capacity, dtype, mode, mid)[0] <= room else (lo, mid - 1)
    return lo


def host_filled(shape, dtype, fill) -> jax.Array:
    """A pinned host array of `fill`, written by host compute (XLA `compute_on("device_host")`).
    Filled on the device and moved (`device_put(jnp.full(...), Host)` inside jit, or an
    out_sharding), the store would first take as much device memory as its own size: on the H200 a
    32 GiB store peaked at 32.08 GiB of device memory that way and at 0 this way; at 8B / 128K /
    batch 27 the 108 GiB device copy left the prefill no room."""
    fill_on_host = compute_on(compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)
    return jax.jit(fill_on_host(lambda: jnp.full(shape, fill, dtype)))()


def init_offloaded(cfg: ModelConfig, batch: int, capacity: int, dtype, mode: str, pool_slots: int,
                   rope_len=None, loader: str = "auto") -> OffloadedKV:
    """An empty offloaded cache; the host store is allocated directly in pinned host memory."""
    shapes, on_host = offload_shapes(cfg, batch, capacity, dtype, mode, pool_slots)

    def make(name, s):
        fill = -1 if name in ("table", "prev_ids") else 0
        if name in on_host:  # filled by host compute, typed <host>: see host_filled
            return host_filled(s.shape, s.dtype, fill)
        return jnp.full(s.shape, fill, s.dtype)

    arrays = {k: make(k, s) for k, s in shapes.items()}
    arrays["rope_len"] = (jnp.full((batch,), capacity, jnp.int32) if rope_len is None
                          else jnp.asarray(rope_len, jnp.int32).reshape(batch))
    from pallas_kernels.kv_loader import loader_path

    # "auto" is resolved here, outside any trace (on a GPU it runs a one-time zero-copy check)
    return OffloadedKV(**arrays, capacity=capacity, loader=loader_path(loader))


# ------------------------------------------------------------------------------- prefill handoff
def store_prefill(off: OffloadedKV, dev: KVCache, b0, *, n: NosaConfig) -> OffloadedKV:
    """Move a prefilled on-device cache of sequences b0 .. b0 + g - 1 into the offloaded cache:
    keys/values to the host store (block layout), the small arrays to the device, the last R keys
    to the ring. Both caches must come from the same model config.

    The K/V go one layer per call (`_store_layer`): the block-layout copy of every layer at once
    took as much device memory again as the group's cache (36 GiB at 8B / 128K / 9 sequences), and
    a loop over the layers inside one program did too (XLA copied the whole cache into the loop's
    layout: 1 GiB of temporaries for a 1 GiB group, measured on the H200, session 11)."""
    host_kv = off.host_kv
    b0 = jnp.asarray(b0, jnp.int32)
    for layer in range(dev.k.shape[0]):
        host_kv = _store_layer(host_kv, dev.k, dev.v, jnp.int32(layer), b0)
    return _store_rest(dataclasses.replace(off, host_kv=host_kv), dev, b0, n=n)


@partial(jax.jit, donate_argnames=("host_kv",))
def _store_layer(host_kv: jax.Array, k: jax.Array, v: jax.Array, layer, b0) -> jax.Array:
    """Write layer `layer` of K/V [L, g, T, Hk, D] into the host store [L, B, Hk, NB + F, 2, bs, D]
    at sequence b0; the device holds only this layer's block-layout copy meanwhile."""
    _, g, T, Hk, D = k.shape
    bs = host_kv.shape[-2]

    def to_blocks(x):  # [g, T, Hk, D] -> [g, Hk, nb, bs, D]
        return jnp.moveaxis(lax.dynamic_index_in_dim(x, layer, keepdims=False).reshape(g, T // bs, bs, Hk, D), 3, 1)

    z = jnp.zeros((), jnp.int32)
    kv = jnp.stack([to_blocks(k), to_blocks(v)], axis=3)[None]  # [1, g, Hk, nb, 2, bs, D]
    return lax.dynamic_update_slice(host_kv, jax.device_put(kv, jax.memory.Space.Host), (layer, b0) + (z,) * 5)


@partial(jax.jit, static_argnames=("n",), donate_argnames=("off",))
def _store_rest(off: OffloadedKV, dev: KVCache, b0, *, n: NosaConfig) -> OffloadedKV:
    """store_prefill's device part: compressed keys, scores, the ring, lengths (host_kv passes)."""
    T = dev.k.shape[2]
    z = jnp.zeros((), jnp.int32)

    def put(dst, src):  # device arrays [L, B, X, ...] <- [L, g, x <= X, ...]
        if dst.shape[2] == 0:
            return dst
        return lax.dynamic_update_slice(dst, src[:, :, : dst.shape[2]].astype(dst.dtype), (z, b0) + (z,) * (dst.ndim - 2))

    R = off.ring_k.shape[2]
    pos = dev.length[:, None] - R + jnp.arange(R)  # [g, R] the last R positions of each prompt
    ring = jnp.take_along_axis(dev.k, jnp.clip(pos, 0, T - 1)[None, :, :, None, None], axis=2)  # [L, g, R, Hk, D]
    order = jnp.argsort(pos % R, axis=1)  # which of those keys goes to ring index 0, 1, ...
    ring = jnp.take_along_axis(ring, order[None, :, :, None, None], axis=2).astype(off.ring_k.dtype)
    ring_k = lax.dynamic_update_slice(off.ring_k, ring, (z, b0, z, z, z))
    length = lax.dynamic_update_slice(off.length, dev.length, (b0,))
    flushed = lax.dynamic_update_slice(off.flushed, dev.length, (b0,))
    return dataclasses.replace(off, cis=put(off.cis, dev.cis),
                               ktilde=put(off.ktilde, dev.ktilde), cisw=put(off.cisw, dev.cisw),
                               ring_k=ring_k, length=length, flushed=flushed)


# ------------------------------------------------------------------------------------ slot policy
def assign_slots(table, stamp, ids, now):
    """Place the selected blocks in the pool of one layer.

    table, stamp: [B, Hk, S]; ids: [B, Hk, K] selected block ids (-1 unused); now: [B] LRU clock.
    Returns (slots [B, Hk, K] (-1 for unused entries), loads [B, Hk, K] block to load into that
    entry's slot or -1 (a hit or unused), new table, new stamp). Misses take the slots that hold
    no selected block: empty ones first (lowest slot first), then the least recently selected.
    """
    S = table.shape[-1]
    valid = ids >= 0
    match = (table[..., None, :] == ids[..., :, None]) & valid[..., None]  # [B, Hk, K, S]
    hit = jnp.any(match, axis=-1)
    hit_slot = jnp.argmax(match, axis=-1).astype(jnp.int32)
    miss = valid & ~hit
    held = jnp.any(match, axis=-2)  # [B, Hk, S] slot holds a selected block: never evicted now
    big = jnp.iinfo(jnp.int32).max
    prio = jnp.where(held, big, jnp.where(table < 0, -1, stamp))
    order = jnp.argsort(prio, axis=-1, stable=True).astype(jnp.int32)  # eviction order of the slots
    rank = jnp.cumsum(miss.astype(jnp.int32), axis=-1) - 1  # this miss is the rank-th one
    miss_slot = jnp.take_along_axis(order, jnp.clip(rank, 0, S - 1), axis=-1)
    slots = jnp.where(hit, hit_slot, jnp.where(miss, miss_slot, -1))
    loads = jnp.where(miss, ids, -1)
    B, Hk, K = ids.shape
    bi = jnp.arange(B)[:, None, None]
    hi = jnp.arange(Hk)[None, :, None]
    tgt = jnp.where(valid, slots, S)  # unused entries write out of range (dropped)
    table = table.at[bi, hi, tgt].set(ids, mode="drop")
    stamp = stamp.at[bi, hi, tgt].set(jnp.broadcast_to(now[:, None, None], ids.shape), mode="drop")
    return slots, loads, table, stamp


def _count_in(a, b):
    """Per row: how many valid (>= 0) entries of a [.., K] also appear in b [.., K]."""
    return jnp.sum(jnp.any((a[..., :, None] == b[..., None, :]) & (a[..., :, None] >= 0), axis=-1), axis=-1)


# --------------------------------------------------------------------------------- decode step
def _append(off: OffloadedKV, layer, pos, live, k, cis, n: NosaConfig, settings):
    """One decode token per sequence (k [B, Hk, D], cis [B, Hk] at `pos`; sequences not `live`
    write nothing) into the ring of recent keys and the cis history, and the window it completes
    (its mean key and mean score) into ktilde / cisw. Returns (ring_k, cis, ktilde, cisw).

    With the Pallas append (impl "pallas" and cache_write.APPEND_IMPL "pallas") one kernel does it
    all in place, the window means included (cache_write.append_token); otherwise XLA scatters
    write the token and the means come from the written arrays (no reader of an old buffer may
    follow its in-place update: XLA would copy the whole [L, B, T, Hk] history each layer to keep
    it, 67 MB at 8B / 16K / batch 16, seen in session 21). Both store the same bits."""
    from pallas_kernels import cache_write

    k, cis = k.astype(off.ring_k.dtype), cis.astype(off.cis.dtype)
    if cache_write.APPEND_IMPL not in ("xla", "pallas"):
        raise ValueError(f"cache_write.APPEND_IMPL must be 'xla' or 'pallas', got {cache_write.APPEND_IMPL!r}")
    if settings.impl == "pallas" and cache_write.APPEND_IMPL == "pallas":
        return cache_write.append_token(off.ring_k, off.cis, off.ktilde, off.cisw, layer, pos, live, k, cis, n,
                                        interpret=settings.interpret)
    R, T, C = off.ring_k.shape[2], off.cis.shape[2], off.ktilde.shape[2]
    b_idx = jnp.arange(pos.shape[0])
    ring_k = off.ring_k.at[layer, b_idx, jnp.where(live, pos % R, R)].set(k, mode="drop")
    cis_h = off.cis.at[layer, b_idx, jnp.where(live, pos, T)].set(cis, mode="drop")
    ktilde, cisw = off.ktilde, off.cisw
    c0 = nosa.num_windows(pos, n)  # the window that a token at `pos` may complete
    w_idx = jnp.where(live & (c0 * n.kernel_stride + n.kernel_size - 1 == pos), c0, C)
    if C:  # the same gather-then-mean as `cache.new_windows`, from the ring
        def one(ring_b, c):
            seg = ring_b[(c * n.kernel_stride + jnp.arange(n.kernel_size)) % R]
            return nosa.window_means(seg[None], n)[0]

        new_k = jax.vmap(one)(ring_k[layer], c0)[:, 0]
        ktilde = ktilde.at[layer, b_idx, w_idx].set(new_k.astype(ktilde.dtype), mode="drop")
    if cisw.shape[2]:
        _, new_c = new_windows(cis_h[layer], cis[:, None], pos, 1, n)
        cisw = cisw.at[layer, b_idx, w_idx].set(new_c[:, 0], mode="drop")
    return ring_k, cis_h, ktilde, cisw


def decode_attend(q, k, v, cis, layer, off: OffloadedKV, start, n: NosaConfig, settings):
    """One decode token per sequence against the offloaded cache (see the module docstring).

    q: [B, 1, Hq, D]; k: [B, 1, Hk, D]; v: [B, 1, X >= Hk, D], the values in its last Hk heads (the
    model passes its whole q|k|v projection: the fetching kernel reads them there, where a slice
    would be one more copy per layer); cis: [B, 1, Hk]; start: [B] positions; `off.length`
    already holds the new lengths (sequences that have stopped keep theirs: start == length).
    Returns (o [B, 1, Hq, D], block_ids [B, Hk, 1, K], updated cache).
    """
    from pallas_kernels import slots as slots_kernel
    from pallas_kernels.kv_loader import load_blocks, loader_path

    if q.shape[1] != 1:
        raise ValueError("the offloaded cache decodes one token per step; prefill runs on the device "
                         "(Generator.start moves it to the host store)")
    mode, bs = settings.mode, n.block_size
    live = off.length > start  # stopped sequences write nothing and do not count in the statistics
    pos = start

    # 1. append: ring, cis history; refresh the window this token completes (the pool gets the
    #    token in step 4, the host store at the next flush)
    with jax.named_scope("nosa_append"):  # named scopes: profiler labels (bench/offload.py)
        ring_k, cis_h, ktilde, cisw = _append(off, layer, pos, live, k[:, 0], cis[:, 0], n, settings)

    # 2. selection (the same code and data as the on-device cache)
    with jax.named_scope("nosa_select"):
        n_blocks = off.cis.shape[2] // bs
        kv_len = off.length
        if settings.impl == "pallas":
            from pallas_kernels import decode_select

            ids = decode_select(q[:, 0], ktilde, cisw if mode == "nosa" else None, nosa.num_windows(kv_len, n), kv_len,
                                layer, nosa_cfg=n, n_blocks=n_blocks, mode=mode, interpret=settings.interpret)
        else:
            ids = nosa.select_blocks(q, pos[:, None], ktilde[layer], cisw[layer] if mode == "nosa" else None, kv_len,
                                     n_blocks, n, mode)[:, :, 0]

    # 3. slots, and this layer's statistics of the step
    keep = live[:, None, None]
    rows = None  # the new token's pool rows, when the slot kernel finds them
    with jax.named_scope("nosa_slots"):
        if (settings.impl == "pallas" and slots_kernel.SLOTS_IMPL == "pallas"
                and slots_kernel.supported(off.table.shape[-1], ids.shape[-1])):
            in_kernel = dict(start=pos, block_size=bs) if slots_kernel.ROWS == "kernel" else {}
            slots, loads, *state = slots_kernel.update_slots(off.table, off.stamp, off.prev_ids, off.misses,
                                                             off.reused, off.selected, layer, ids, kv_len, live,
                                                             interpret=settings.interpret, **in_kernel)
            if in_kernel:
                *state, rows = state
            counted = dict(zip(("table", "stamp", "prev_ids", "misses", "reused", "selected"), state))
        else:
            slots, loads, table_l, stamp_l = assign_slots(off.table[layer], off.stamp[layer], ids, kv_len)
            loads = jnp.where(keep, loads, -1)
            prev = off.prev_ids[layer]
            lv = live[:, None].astype(jnp.int32)
            counted = dict(
                table=off.table.at[layer].set(jnp.where(keep, table_l, off.table[layer])),
                stamp=off.stamp.at[layer].set(jnp.where(keep, stamp_l, off.stamp[layer])),
                prev_ids=off.prev_ids.at[layer].set(jnp.where(keep, ids, prev)),
                misses=off.misses.at[layer].set(jnp.sum(loads >= 0, axis=-1).astype(jnp.int32)),
                reused=off.reused.at[layer].set(_count_in(ids, prev).astype(jnp.int32) * lv),
                selected=off.selected.at[layer].set(jnp.sum(ids >= 0, axis=-1).astype(jnp.int32) * lv))

    # 4. loads, then the new token into its own block's slot (one kernel on the pallas loader path)
    from_kernel = rows is not None
    if not from_kernel:
        own = jnp.max(jnp.where(ids == (pos // bs)[:, None, None], slots, -1), axis=-1)  # [B, Hk]
        rows = jnp.where(live[:, None] & (own >= 0), own * bs + pos[:, None] % bs, -1)  # [B, Hk]
    if settings.impl == "pallas" and LOADS == "fused" and loader_path(off.loader) == "pallas":
        # 4 + 5 in one kernel: the misses' PCIe reads overlap the attention over the hits
        from pallas_kernels.sparse_decode import Fetch, sparse_decode_attention_fetch

        with jax.named_scope("nosa_attend_fetch"):  # the step split counts it as attention
            fetch = Fetch(off.host_kv, cis_h, loads, k[:, 0], v[:, 0], cis[:, 0], rows, off.merge_count)
            # unselected entries (id -1, slot -1) are masked, and the kernel keeps their address in the pool
            o, pool_k, pool_v, pool_bias, merge_count = sparse_decode_attention_fetch(
                q[:, 0], off.pool_k, off.pool_v, off.pool_bias, ids, slots if from_kernel else jnp.maximum(slots, 0),
                pos, layer, fetch, block_size=bs, use_bias=mode == "nosa", interpret=settings.interpret)
    else:
        merge_count = off.merge_count
        with jax.named_scope("nosa_load"):
            pool_k, pool_v, pool_bias = load_blocks(off.host_kv, cis_h, off.pool_k, off.pool_v, off.pool_bias,
                                                    layer, loads, jnp.maximum(slots, 0), block_size=bs,
                                                    new_k=k[:, 0], new_v=v[:, 0, -k.shape[2]:], new_cis=cis[:, 0],
                                                    new_row=rows,
                                                    path=off.loader, interpret=settings.interpret)

        # 5. attention over the pool
        with jax.named_scope("nosa_attend"):
            bias = pool_bias if mode == "nosa" else None
            if settings.impl == "pallas":
                from pallas_kernels import sparse_decode_attention as attend_fn
                kw = dict(interpret=settings.interpret)
            else:
                from pallas_kernels.sparse_decode import sparse_decode_attention_reference as attend_fn
                kw = {}
            o = attend_fn(q[:, 0], pool_k, pool_v, bias, ids, jnp.maximum(slots, 0), pos, layer, block_size=bs,
                          **kw)

    off = dataclasses.replace(off, pool_k=pool_k, pool_v=pool_v, pool_bias=pool_bias, ring_k=ring_k, cis=cis_h,
                              ktilde=ktilde, cisw=cisw, merge_count=merge_count, **counted)
    return o[:, None], ids[:, :, None], off


def flush(off: OffloadedKV, n: NosaConfig, steps: int) -> OffloadedKV:
    """Write every block touched since the last flush, `steps` (static, <= flush_interval) decode
    steps ago, from the pool to the host store.

    Per sequence, blocks flushed // bs .. + F - 1 (F = flush_blocks(n, steps)) of all layers and heads are
    gathered from their slots (K and V) and written with one copy to the host, or, when every
    sequence's window starts at the same block, one copy for the batch. Every such block that holds a
    token is resident (module docstring); blocks past a sequence's end get whatever slot 0 holds,
    and the next flush (which starts at or before them) rewrites them."""
    with jax.named_scope("nosa_flush"):
        return _flush(off, n, steps)


def _flush(off: OffloadedKV, n: NosaConfig, steps: int) -> OffloadedKV:
    L, B, S_bs, Hk, D = off.pool_k.shape
    bs, F = n.block_size, flush_blocks(n, steps)
    first = off.flushed // bs  # [B]
    blocks = first[:, None] + jnp.arange(F)  # [B, F]
    match = off.table[:, :, :, None, :] == blocks[None, :, None, :, None]  # [L, B, Hk, F, S]
    slot = jnp.argmax(match, axis=-1)  # [L, B, Hk, F] (0 when not resident)
    rows = slot[..., None] * bs + jnp.arange(bs)  # [L, B, Hk, F, bs]
    li = jnp.arange(L)[:, None, None, None, None]
    bi = jnp.arange(B)[None, :, None, None, None]
    hi = jnp.arange(Hk)[None, None, :, None, None]
    z = jnp.zeros((), jnp.int32)
    win = jnp.stack([off.pool_k[li, bi, rows, hi], off.pool_v[li, bi, rows, hi]], axis=4)  # [L, B, Hk, F, 2, bs, D]

    def whole_batch(store):  # every window starts at the same block: one host write
        return lax.dynamic_update_slice(store, jax.device_put(win, jax.memory.Space.Host), (z, z, z, first[0], z, z, z))

    def per_sequence(store):  # one host write per sequence: all layers, heads and window blocks
        for b in range(B):
            part = jax.device_put(win[:, b:b + 1], jax.memory.Space.Host)
            store = lax.dynamic_update_slice(store, part, (z, jnp.int32(b), z, first[b], z, z, z))
        return store

    # each host write costs about 0.3 ms beyond its bytes: 16 writes of 4 MiB took 6.4 ms on the
    # H200, one of 64 MiB 1.6 ms (bench/results/probe-flush-s11-*)
    store = (whole_batch(off.host_kv) if B == 1 else
             lax.cond(jnp.all(first == first[0]), whole_batch, per_sequence, off.host_kv))
    return dataclasses.replace(off, host_kv=store, flushed=off.length)


# ------------------------------------------------------------------------------- capacity planning
_BFC_UNIT = 256  # the BFC allocator's allocation granularity
_BFC_FIRST_REGION = 2 << 20  # a growing BFC pool's first region size


def pinned_pool_reservation(sizes: Sequence[int], limit: int, *, preallocated: bool) -> int | None:
    """Bytes of pinned host memory that XLA's pool (a BFC allocator, `xla_gpu_host_bfc`, of `limit`
    bytes) reserves to hold arrays of `sizes` bytes allocated in this order into an empty pool, or
    None when one of them cannot be placed.

    The pool grows by regions. A request that fits no free tail of a region gets a new region:
    the region size doubles (from 2 MiB) until it holds the request, the region takes that size
    or what is left of the limit if less, and a region that did not need to grow doubles the size
    of the next one. So two arrays of X bytes (K and V, before the store became one array) take a
    region of the next power of two >= X and a second of that size: two 2.02 GiB arrays reserve 8
    GiB (measured on the H200, bench/results/probe-host-peak-*), and two of 50 GiB fail under a 112
    GiB limit (the first region is 64 GiB, 48 GiB are left for the second), while one array fits
    whenever it is no larger than the limit. A preallocated pool is one region of the whole limit
    from the start, which the arrays fill exactly.
    """
    unit = _BFC_UNIT
    region_size = limit // unit * unit if preallocated else _BFC_FIRST_REGION
    reserved, tails = 0, []  # free bytes at the end of each region (nothing is freed here)
    for n in (-(-int(x) // unit) * unit for x in sizes):
        fitting = [i for i, t in enumerate(tails) if t >= n]
        if fitting:  # best fit: the smallest free tail that holds the request
            i = min(fitting, key=lambda j: tails[j])
            tails[i] -= n
            continue
        available = (limit - reserved) // unit * unit
        if n > available:
            return None
        grew = n > region_size
        while n > region_size:
            region_size *= 2
        region = min(region_size, available)
        if not grew:
            region_size *= 2
        reserved += region
        tails.append(region - n)
    return reserved


def pinned_pool_limit_needed(sizes: Sequence[int]) -> int:
    """The smallest pool limit, in whole GiB, in which a growing pinned pool places `sizes`
    (pinned_pool_reservation): for two arrays of X bytes, next_pow2(X) + X, between 1 and 1.5 times
    their bytes."""
    gib = max(1, math.ceil(sum(sizes) / 2**30))
    while pinned_pool_reservation(sizes, gib * 2**30, preallocated=False) is None:
        gib += 1
    return gib


def store_in_pinned_pool(store_bytes: int, pool: int | None, *, preallocated: bool = False) -> int | None:
    """Host memory the store (one array of `store_bytes`) takes: in a growing pinned pool of `pool`
    bytes the region it reserves for it (pinned_pool_reservation), in a preallocated pool or off the
    GPU (`pool` None) its bytes; None when the pool cannot place it."""
    if pool is None:
        return store_bytes
    reserved = pinned_pool_reservation([store_bytes], pool, preallocated=preallocated)
    return store_bytes if reserved is not None and preallocated else reserved


def weight_bytes(cfg: ModelConfig, dtype) -> int:
    from .model import abstract_params

    return sum(int(math.prod(a.shape)) * jnp.dtype(dtype).itemsize for a in jax.tree.leaves(abstract_params(cfg)))


def capacity_plan(cfg: ModelConfig, dtype, *, context: int, gpu_budget: int, host_budget: int,
                  mode: str = "nosa", pool_slots: int | None = None, batch: int | None = None,
                  pinned_pool: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> dict:
    """Largest batch at `context` tokens per sequence (and, given `batch`, the largest context) for
    the three ways of holding the KV cache, counting the weights and the KV state (not the
    activations of a step):
      dense             full attention, every token's K/V on the device
      sparse_on_device  `mode` (nosa/infllmv2) with the whole cache on the device
      offloaded         `mode` with K/V in host memory and a device pool of `pool_slots` slots
                        (default 2 x top-k), plus room to prefill one sequence on the device
                        in calls of `prefill_chunk` tokens;
                        with `pinned_pool` (the GPU client's pinned pool limit, growing) the store
                        must also be placed in it, and the host budget counts the regions it takes
                        (pinned_pool_reservation).
    Bytes are per sequence; budgets in bytes."""
    w = weight_bytes(cfg, dtype)
    free = gpu_budget - w

    def slots(ctx):
        return pool_size(cfg, ctx, pool_slots)

    def per_seq(kind, ctx):
        if kind == "dense":
            return cache_bytes(cfg, 1, ctx, dtype, "full"), 0, 0
        if kind == "sparse_on_device":
            return cache_bytes(cfg, 1, ctx, dtype, mode), 0, 0
        dev, host = offload_bytes(cfg, 1, ctx, dtype, mode, slots(ctx))
        return dev, host, prefill_bytes(cfg, ctx, dtype, mode, prefill_chunk)  # + one sequence's prefill

    def pinned_fits(b, host):  # the store placed in the pool, its region within the host budget
        taken = store_in_pinned_pool(b * host, pinned_pool)
        return taken is not None and taken <= host_budget

    def max_batch(kind, ctx):
        dev, host, fixed = per_seq(kind, ctx)
        b = (free - fixed) // dev if free - fixed > 0 else 0
        if host:
            b = min(b, host_budget // host)
            if pinned_pool is not None:  # feasibility only shrinks as the batch grows: bisect
                lo, hi = 0, max(0, b)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if pinned_fits(mid, host) else (lo, mid - 1)
                b = lo
        return int(max(0, b))

    def max_context(kind, b):  # the largest multiple of the block size that fits b sequences
        step = cfg.nosa.block_size
        lo, hi = 0, cfg.max_position_embeddings // step
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if max_batch(kind, mid * step) >= b else (lo, mid - 1)
        return lo * step

    plan = {"weights_bytes": w, "gpu_budget": gpu_budget, "host_budget": host_budget, "context": context}
    for kind in ("dense", "sparse_on_device", "offloaded"):
        dev, host, _ = per_seq(kind, context)
        plan[kind] = {"device_bytes_per_seq": dev, "host_bytes_per_seq": host,
                      "max_batch": max_batch(kind, context)}
        if kind == "offloaded":
            plan[kind]["pool_slots"] = slots(context)
        if batch:
            plan[kind]["max_context_at_batch"] = max_context(kind, batch)
    return plan
