"""Host-offloaded KV store <-> device slot pool: block loads and token appends for the decode step.

Layouts (L layers, B sequences, Hk kv heads, NB host blocks, bs = block_size, D head_dim, S slots):
  host_k, host_v : [L, B, Hk, NB, bs, D] model dtype, normally in `pinned_host` memory; every
                   (layer, sequence, head, block) is one contiguous bs*D chunk.
  pool_k, pool_v : [L, B, S*bs, Hk, D] device; slot s of head h = rows s*bs .. s*bs+bs-1, column h
                   (the layout `sparse_decode.sparse_decode_attention` reads).
  pool_bias      : [L, B, S*bs, Hk] float32 device.
  cis            : [L, B, T, Hk] float32 device, T <= NB*bs (the full eviction-score history; the
                   store may hold spare blocks past it).

Operations
  load_blocks(...)   copy host block blocks[b,h,m] of `layer` into slot slots[b,h,m] of head h of
                     sequence b (K, V, and the cis rows of that block into pool_bias); blocks < 0 skip.
  append_tokens(...) write k[b], v[b] ([Hk, D]) at token pos[b] of `layer` in the host store; pos < 0
                     skips.
Both update their destination in place (input_output_aliases / donation-friendly dynamic_update_slice).

Paths (`path=`):
  "pallas": one Triton-backend `pl.pallas_call` per call, every operand `memory_space=pl.ANY`,
            the layer index read in-kernel (traced scalar), one program per (b, h, entry) for
            load_blocks (K, V and bias in the same program, skipped with `pl.when`), one per (b, h)
            for append_tokens. On the H200 the load kernel reads the pinned host buffer in place
            (zero copy over PCIe through UVA; 27-41 GB/s measured for 8-64 MiB picks, see
            /work/shared/notes/jax-gpu.md C.2 and the Addendum).
  "xla":    no custom kernel: per entry `lax.dynamic_slice` of the host array ->
            `jax.device_put(., jax.memory.Space.Device)` into a device staging array [B*Hk*M, bs, D]
            (Python-unrolled up to `xla_unroll_max` entries, else a `lax.fori_loop` of
            dynamic_update_slices), then ONE scatter per pool (`.at[...].set(mode="drop")`) with the
            rows of skipped entries pointed past the pool, so they are dropped; the bias is a device
            gather from cis scattered the same way. Skipped entries still transfer (block 0).
            A first version wrote each entry with dynamic_update_slice of `where(ok, new, old)`:
            XLA (CPU) then copied the whole pool every step, the scatter does not. append_tokens: per
            sequence `jax.device_put(x, Space.Host)` + `dynamic_update_slice` into the donated host
            array (0.2-0.37 ms per call measured on the H200). The store is never read: a skipped
            sequence (pos < 0) repeats the first valid sequence's write (same place, same value), and
            when no sequence is valid the append is a `lax.cond` no-op. (Re-writing the token's old
            value instead -- a read-modify-write of the store -- made XLA copy the whole store per
            call inside fori_loop/scan, in several variants.)
  "auto":   see `loader_path`.

What runs on the CPU (jax 0.11.2, found by the experiments behind tests/test_kv_loader.py)
  * The "xla" path compiles and runs natively on the CPU with host_k/host_v in `pinned_host` memory
    (dynamic_slice with device-resident scalar indices on a host array is accepted; mixing memory
    spaces is only rejected for the data operands of gather/select/etc.), bit-exact, and under jit
    with donated pools the compiled HLO has no copy of the pool. So "auto" = "xla" off the GPU.
  * The "pallas" path runs on the CPU only with interpret=True. Interpret mode ACCEPTS
    `pinned_host` operands (it discharges the kernel into a while loop of dynamic slices; the CPU
    backend does not care where "host" lives), bit-exact for normal numbers. Its compiled HLO is not representative of
    the GPU one (the interpreter carries both the aliased input and the output in its while loop),
    so the in-place check of the pallas path is done on the CUDA-lowered StableHLO (one
    `__gpu$xla.gpu.triton` custom call with `output_operand_aliases`) and on the GPU by
    bench/probe_offload.py.

Ordering loads before appends (decode loop): when one loop body both reads the host store
(load_blocks) and then writes it (append_tokens), XLA (CPU, seen in a scan over layers inside a
fori_loop) copied the whole host store each iteration because nothing orders the reads before the
in-place writes. `order_after_load(...)` (a `lax.optimization_barrier` over the host stores and the
loaded pools) between the two removes every copy; tests/test_kv_loader.py checks it on the CPU and
bench/probe_offload.py case (5) on the GPU.

Interpret-mode caveat: the CPU interpreter flushes bf16 subnormals to zero in the copies (XLA CPU
runs with denormals flushed); the "xla" path and the GPU kernel copy bits. Tests use normal values.

pallas_call and pinned_host OUTPUTS (read from jax 0.11.2 `_pallas_call_abstract_eval`, checked on the
CPU and by lowering for CUDA):
  * A pallas_call may TAKE a pinned_host operand: the avals keep `<host>`, the lowered StableHLO
    passes the argument with `mhlo.memory_kind = "pinned_host"` straight to the custom call, and on
    the GPU the kernel then dereferences the host pointer (zero copy, measured).
  * A pallas_call cannot RETURN a host array: its abstract eval rewrites every output aval to
    `MemorySpace.Device`, even an output aliased to a pinned_host input. So an append kernel that
    aliases the host store comes back typed `float32[...]` (device), and a `fori_loop`/`scan` whose
    carry holds the host store fails to trace ("carry input ... float32<host>[...] but the
    corresponding output ... float32[...]"). append_tokens(path="pallas") therefore re-labels the
    result with `jax.device_put(out, Space.Host)`, which lowers (for CUDA) to the triton custom call
    (aliasing the pinned_host operand to a device-kind result) followed by an
    `annotate_device_placement` custom call with `_xla_buffer_placement = "pinned_host"`. On the CPU
    (interpret mode) this is bit-exact. On the GPU whether XLA accepts an aliased host operand whose
    result is device-typed, and whether the re-label becomes a full D2H copy of the store, is exactly
    what probe_offload.py cases (3)/(5) measure. Until then "auto" for append_tokens is "xla"
    everywhere. (Writing through an UN-aliased host operand would avoid the output typing but XLA
    would not know the buffer changed; not done.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

PATHS = ("auto", "pallas", "xla")
UNROLL_MAX = 256  # the xla path unrolls its per-entry fetches up to this many entries, else fori_loop


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover - no backend
        return False


def loader_path(path: str = "auto", op: str = "load_blocks") -> str:
    """The implementation that `path` selects for `op` ("load_blocks" or "append_tokens").

    auto -> load_blocks: "pallas" on the GPU (zero-copy reads of the pinned store), "xla" elsewhere
    (the Triton kernel needs interpret=True off the GPU; the xla path runs natively on the CPU with
    pinned_host arrays). append_tokens: "xla" everywhere until probe_offload.py shows the pallas
    append is copy-free on the GPU (see the module docstring).
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: expected one of {PATHS}")
    if op not in ("load_blocks", "append_tokens"):
        raise ValueError(f"unknown op {op!r}")
    if path != "auto":
        return path
    if op == "append_tokens":
        return "xla"
    return "pallas" if _on_gpu() else "xla"


def order_after_load(host_k, host_v, pool_k, pool_v, pool_bias):
    """Barrier between `load_blocks` (reads the host store) and `append_tokens` (writes it) in one
    loop body: returns its arguments unchanged, but XLA must finish the loads before the appends
    may update the store in place (without it XLA copies the whole store; see the module docstring).
    Usage: pk, pv, pb = load_blocks(hk, hv, ...); hk, hv, pk, pv, pb = order_after_load(hk, hv, pk, pv, pb);
    hk, hv = append_tokens(hk, hv, ...)."""
    return lax.optimization_barrier((host_k, host_v, pool_k, pool_v, pool_bias))


def _is_host(x) -> bool:
    return getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host


def _check_load_args(host_k, host_v, cis, pool_k, pool_v, pool_bias, blocks, slots, block_size):
    L, B, Hk, NB, bs, D = host_k.shape
    if host_v.shape != host_k.shape or bs != block_size:
        raise ValueError(f"host_k {host_k.shape} / host_v {host_v.shape} must be [L, B, Hk, NB, {block_size}, D]")
    if pool_k.ndim != 5 or pool_k.shape[:2] != (L, B) or pool_k.shape[3:] != (Hk, D) or pool_v.shape != pool_k.shape:
        raise ValueError(f"pool_k {pool_k.shape} / pool_v {pool_v.shape} must be [{L}, {B}, S*bs, {Hk}, {D}]")
    if pool_k.shape[2] % block_size:
        raise ValueError(f"pool length {pool_k.shape[2]} must be a multiple of block_size {block_size}")
    if pool_bias.shape != pool_k.shape[:4]:
        raise ValueError(f"pool_bias {pool_bias.shape} must be {pool_k.shape[:4]}")
    if cis.shape[:2] != (L, B) or cis.shape[3] != Hk or cis.shape[2] % bs or cis.shape[2] > NB * bs:
        raise ValueError(f"cis {cis.shape} must be [{L}, {B}, T, {Hk}] with T a multiple of {bs} and <= {NB * bs} "
                         f"(the host store may hold spare blocks past the cis history)")
    if blocks.ndim != 3 or blocks.shape[:2] != (B, Hk) or slots.shape != blocks.shape:
        raise ValueError(f"blocks {blocks.shape} / slots {slots.shape} must be [{B}, {Hk}, M]")
    if host_k.dtype != pool_k.dtype:
        raise ValueError(f"host dtype {host_k.dtype} != pool dtype {pool_k.dtype}")
    return L, B, Hk, NB, bs, D, blocks.shape[2]


# ----------------------------------------------------------------------------------------------
# load_blocks
# ----------------------------------------------------------------------------------------------

def _load_kernel(layer_ref, blocks_ref, slots_ref, hk_ref, hv_ref, cis_ref, _pk_in, _pv_in, _pb_in,
                 pk_ref, pv_ref, pb_ref, *, block_size: int):
    b = pl.program_id(0)
    h = pl.program_id(1)
    m = pl.program_id(2)
    layer = layer_ref[0]
    blk = blocks_ref[b, h, m]

    @pl.when(blk >= 0)
    def _copy():
        slot = slots_ref[b, h, m]
        dst = pl.ds(pl.multiple_of(slot * block_size, block_size), block_size)
        src = pl.ds(pl.multiple_of(blk * block_size, block_size), block_size)
        # Plain loads/stores (`ref[...] = x` would lower to a swap that also reads the old contents).
        pltriton.store(pk_ref.at[layer, b, dst, h, :], pltriton.load(hk_ref.at[layer, b, h, blk, :, :]))
        pltriton.store(pv_ref.at[layer, b, dst, h, :], pltriton.load(hv_ref.at[layer, b, h, blk, :, :]))
        pltriton.store(pb_ref.at[layer, b, dst, h], pltriton.load(cis_ref.at[layer, b, src, h]))


def _load_pallas(host_k, host_v, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, *, block_size,
                 interpret, num_warps):
    B, Hk, M = blocks.shape
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    args = (layer_arr, blocks.astype(jnp.int32), slots.astype(jnp.int32), host_k, host_v, cis,
            pool_k, pool_v, pool_bias)
    return pl.pallas_call(
        functools.partial(_load_kernel, block_size=block_size),
        grid=(B, Hk, M),
        in_specs=[any_spec] * len(args),
        out_specs=[any_spec] * 3,
        out_shape=[jax.ShapeDtypeStruct(pool_k.shape, pool_k.dtype),
                   jax.ShapeDtypeStruct(pool_v.shape, pool_v.dtype),
                   jax.ShapeDtypeStruct(pool_bias.shape, pool_bias.dtype)],
        input_output_aliases={6: 0, 7: 1, 8: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="nosa_kv_load_blocks",
    )(*args)


def _load_xla(host_k, host_v, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, *, block_size,
              unroll_max=UNROLL_MAX):
    B, Hk, M = blocks.shape
    D = host_k.shape[-1]
    T = pool_k.shape[2]
    N = B * Hk * M
    if N == 0:
        return pool_k, pool_v, pool_bias
    layer = jnp.asarray(layer, jnp.int32)
    blocks = blocks.astype(jnp.int32)
    blk_c = jnp.maximum(blocks, 0).reshape(N)
    zero = jnp.int32(0)
    dev = jax.memory.Space.Device

    def fetch_one(host, e):
        b, h = e // (Hk * M), (e // M) % Hk
        x = lax.dynamic_slice(host, (layer, jnp.asarray(b, jnp.int32), jnp.asarray(h, jnp.int32), blk_c[e], zero, zero),
                              (1, 1, 1, 1, block_size, D))
        return jax.device_put(x, dev).reshape(1, block_size, D)

    def fetch(host):
        # One dynamic_slice + H2D transfer per entry (notes C.2, A2 unrolled / A fori_loop); skipped
        # entries fetch block 0 and are dropped by the scatter below.
        if N <= unroll_max:
            parts = [fetch_one(host, e) for e in range(N)]
            staged = jnp.concatenate(parts, axis=0)
        else:
            def body(e, buf):
                return lax.dynamic_update_slice(buf, fetch_one(host, e), (e, zero, zero))
            staged = lax.fori_loop(0, N, body, jnp.zeros((N, block_size, D), host.dtype), unroll=8)
        return staged.reshape(B, Hk, M, block_size, D)

    i = jnp.arange(block_size, dtype=jnp.int32)
    # Destination rows; skipped entries point past the pool and are dropped (mode="drop"), so the
    # pool is never read and the scatter updates it in place.
    rows = jnp.where(blocks[..., None] >= 0, slots.astype(jnp.int32)[..., None] * block_size + i, T)  # [B,Hk,M,bs]
    b_idx = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h_idx = jnp.arange(Hk, dtype=jnp.int32)[None, :, None, None]
    pool_k = pool_k.at[layer, b_idx, rows, h_idx].set(fetch(host_k), mode="drop")
    pool_v = pool_v.at[layer, b_idx, rows, h_idx].set(fetch(host_v), mode="drop")
    src = jnp.maximum(blocks, 0)[..., None] * block_size + i
    bias = cis[layer, b_idx, src, h_idx]  # [B,Hk,M,bs] device gather from the score history
    pool_bias = pool_bias.at[layer, b_idx, rows, h_idx].set(bias, mode="drop")
    return pool_k, pool_v, pool_bias


@functools.partial(jax.jit, static_argnames=("block_size", "path", "interpret", "num_warps", "xla_unroll_max"),
                   donate_argnames=("pool_k", "pool_v", "pool_bias"))
def load_blocks(host_k, host_v, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, *, block_size: int,
                path: str = "auto", interpret: bool = False, num_warps: int = 4,
                xla_unroll_max: int = UNROLL_MAX):
    """Copy host blocks into device pool slots, in place. Returns (pool_k, pool_v, pool_bias).

    host_k, host_v: [L, B, Hk, NB, bs, D] (pinned_host, or device); cis: [L, B, T <= NB*bs, Hk] f32;
    pool_k, pool_v: [L, B, S*bs, Hk, D]; pool_bias: [L, B, S*bs, Hk] f32 (the three are donated);
    layer: int32 scalar (may be traced); blocks, slots: [B, Hk, M] int32. For every entry with
    blocks[b,h,m] >= 0: pool_{k,v}[layer, b, s*bs:(s+1)*bs, h] = host_{k,v}[layer, b, h, blk] and
    pool_bias[layer, b, s*bs:(s+1)*bs, h] = cis[layer, b, blk*bs:(blk+1)*bs, h] with s = slots[b,h,m].
    Entries with blocks < 0 leave the pool untouched. Two entries of one (b, h) must not name the
    same slot. path: "auto" | "pallas" | "xla" (see `loader_path`). interpret, num_warps: the pallas
    path's; xla_unroll_max: the xla path unrolls its B*Hk*M fetches up to this many, else fori_loop.
    """
    _check_load_args(host_k, host_v, cis, pool_k, pool_v, pool_bias, blocks, slots, block_size)
    which = loader_path(path, "load_blocks")
    if which == "pallas":
        return tuple(_load_pallas(host_k, host_v, cis, pool_k, pool_v, pool_bias, layer, blocks, slots,
                                  block_size=block_size, interpret=interpret, num_warps=num_warps))
    return _load_xla(host_k, host_v, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, block_size=block_size,
                     unroll_max=xla_unroll_max)


# ----------------------------------------------------------------------------------------------
# append_tokens
# ----------------------------------------------------------------------------------------------

def _append_kernel(layer_ref, pos_ref, k_ref, v_ref, _hk_in, _hv_in, hk_ref, hv_ref, *, block_size: int):
    b = pl.program_id(0)
    h = pl.program_id(1)
    layer = layer_ref[0]
    p = pos_ref[b]

    @pl.when(p >= 0)
    def _write():
        blk = p // block_size
        off = p % block_size
        pltriton.store(hk_ref.at[layer, b, h, blk, off, :], pltriton.load(k_ref.at[b, h, :]))
        pltriton.store(hv_ref.at[layer, b, h, blk, off, :], pltriton.load(v_ref.at[b, h, :]))


def _append_pallas(host_k, host_v, layer, pos, k, v, *, block_size, interpret, num_warps):
    B, Hk, D = k.shape
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    args = (jnp.asarray(layer, jnp.int32).reshape(1), pos.astype(jnp.int32), k.astype(host_k.dtype),
            v.astype(host_v.dtype), host_k, host_v)
    out_k, out_v = pl.pallas_call(
        functools.partial(_append_kernel, block_size=block_size),
        grid=(B, Hk),
        in_specs=[any_spec] * len(args),
        out_specs=[any_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct(host_k.shape, host_k.dtype),
                   jax.ShapeDtypeStruct(host_v.shape, host_v.dtype)],
        input_output_aliases={4: 0, 5: 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="nosa_kv_append_tokens",
    )(*args)
    # pallas_call types every output as device memory (see the module docstring): re-label the
    # aliased results so that loop carries holding the host store keep their type.
    if _is_host(host_k):
        out_k = jax.device_put(out_k, jax.memory.Space.Host)
    if _is_host(host_v):
        out_v = jax.device_put(out_v, jax.memory.Space.Host)
    return out_k, out_v


def _append_xla(host_k, host_v, layer, pos, k, v, *, block_size, all_valid: bool = False):
    B, Hk, D = k.shape
    layer = jnp.asarray(layer, jnp.int32)
    pos = pos.astype(jnp.int32)
    zero = jnp.int32(0)
    valid = pos >= 0
    # Skipped sequences never read the store (a read-modify-write made XLA copy the whole store
    # inside loops, see the module docstring): they repeat the first valid sequence's write (same
    # place, same value). If no sequence is valid the whole append is a `lax.cond` no-op.
    first = jnp.argmax(valid).astype(jnp.int32)
    src = jnp.where(valid, jnp.arange(B, dtype=jnp.int32), first)  # [B]
    p = pos[src]

    def write(hosts):
        outs = []
        for host, x in zip(hosts, (k, v)):
            x = x.astype(host.dtype)
            to_host = _is_host(host)
            for b in range(B):
                val = lax.dynamic_index_in_dim(x, src[b], 0, keepdims=False).reshape(1, 1, Hk, 1, 1, D)
                if to_host:
                    val = jax.device_put(val, jax.memory.Space.Host)
                host = lax.dynamic_update_slice(host, val, (layer, src[b], zero, p[b] // block_size,
                                                            p[b] % block_size, zero))
            outs.append(host)
        return tuple(outs)

    if all_valid:  # no predicate to evaluate (on the GPU a cond reads it back to the host each call)
        return write((host_k, host_v))
    return lax.cond(jnp.any(valid), write, lambda hosts: hosts, (host_k, host_v))


@functools.partial(jax.jit, static_argnames=("block_size", "path", "interpret", "num_warps", "all_valid"),
                   donate_argnames=("host_k", "host_v"))
def append_tokens(host_k, host_v, layer, pos, k, v, *, block_size: int, path: str = "auto",
                  interpret: bool = False, num_warps: int = 1, all_valid: bool = False):
    """Write one token per sequence into the host store, in place. Returns (host_k, host_v).

    host_k, host_v: [L, B, Hk, NB, bs, D] (pinned_host or device; donated); layer: int32 scalar
    (may be traced); pos: [B] int32 token positions; k, v: [B, Hk, D]. For every b with pos[b] >= 0:
    host_{k,v}[layer, b, :, pos//bs, pos%bs, :] = {k,v}[b]. Sequences with pos < 0 are untouched.
    path: "auto" | "pallas" | "xla" (see `loader_path(path, "append_tokens")`).
    all_valid=True promises every pos is a valid position (no skipped sequence), which lets the xla
    path drop its "anything to write?" branch.
    """
    L, B, Hk, NB, bs, D = host_k.shape
    if host_v.shape != host_k.shape or bs != block_size:
        raise ValueError(f"host_k {host_k.shape} / host_v {host_v.shape} must be [L, B, Hk, NB, {block_size}, D]")
    if k.shape != (B, Hk, D) or v.shape != (B, Hk, D) or pos.shape != (B,):
        raise ValueError(f"k {k.shape} / v {v.shape} must be {(B, Hk, D)} and pos {pos.shape} must be {(B,)}")
    which = loader_path(path, "append_tokens")
    if which == "pallas":
        return _append_pallas(host_k, host_v, layer, pos, k, v, block_size=block_size, interpret=interpret,
                              num_warps=num_warps)
    return _append_xla(host_k, host_v, layer, pos, k, v, block_size=block_size, all_valid=all_valid)
