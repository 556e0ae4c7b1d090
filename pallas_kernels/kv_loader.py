"""Host-offloaded KV store -> device slot pool: block loads for the decode step (`load_blocks`).

Layouts (L layers, B sequences, Hk kv heads, NB host blocks, bs = block_size, D head_dim, S slots):
  host_kv        : [L, B, Hk, NB, 2, bs, D] model dtype, normally in `pinned_host` memory: K (index 0)
                   and V (1) of every (layer, sequence, head, block) are one contiguous 2*bs*D chunk,
                   and the whole store is one allocation (XLA's pinned pool places one array whenever
                   it fits; two equal arrays of X bytes need a pool of next_pow2(X) + X,
                   `nosa_jax.offload.pinned_pool_reservation`).
  pool_k, pool_v : [L, B, S*bs, Hk, D] device; slot s of head h = rows s*bs .. s*bs+bs-1, column h
                   (the layout `sparse_decode.sparse_decode_attention` reads).
  pool_bias      : [L, B, S*bs, Hk] float32 device.
  cis            : [L, B, T, Hk] float32 device, T <= NB*bs (the full eviction-score history; the
                   store may hold spare blocks past it).

load_blocks(...) copies host block blocks[b,h,m] of `layer` into slot slots[b,h,m] of head h of
sequence b (K, V, and the cis rows of that block into pool_bias); blocks < 0 skip; and, given the
decode step's new token and its pool row, writes it (in the same kernel on the pallas path). The
pools are updated in place (input_output_aliases / donation-friendly scatter).

Only device-side writes live here (the loads, and the decode token's row in the pool, which saves
the step three scatters per layer). The offloaded cache writes new tokens to the host store in
batches of whole blocks with XLA `dynamic_update_slice` (`nosa_jax.offload.flush`), not per step: on
the H200 the per-step single-token device->host writes cost more than the whole on-device step. A
Pallas kernel could not write the store anyway without a re-label: a pallas_call may TAKE a
pinned_host operand but types every output (aliased or not) as device memory (jax 0.11.2
`_pallas_call_abstract_eval`; tests/test_kv_loader.py checks this).

Paths (`path=`):
  "pallas": one Triton-backend `pl.pallas_call` per call, every operand `memory_space=pl.ANY`,
            the layer index read in-kernel (traced scalar), one program per (b, h, entry), K, V and
            bias in the same program, skipped with `pl.when`. On the H200 the kernel reads the
            pinned host buffer in place (zero copy over PCIe through UVA; 26-41 GB/s measured for
            7-64 MiB picks, see /work/shared/notes/jax-gpu.md C.2 and bench/probe_offload.py).
  "xla":    no custom kernel: per entry `lax.dynamic_slice` of the host array (K and V together) ->
            `jax.device_put(., jax.memory.Space.Device)` into a device staging array [B*Hk*M, 2, bs, D]
            (Python-unrolled up to `xla_unroll_max` entries, else a `lax.fori_loop` of
            dynamic_update_slices), then ONE scatter per pool (`.at[...].set(mode="drop")`) with the
            rows of skipped entries pointed past the pool, so they are dropped; the bias is a device
            gather from cis scattered the same way. Skipped entries still transfer (block 0).
            (A dynamic_update_slice of `where(ok, new, old)` per entry made XLA (CPU) copy the whole
            pool every step; the scatter does not.)
  "auto":   see `loader_path`: "xla" off the GPU; on the GPU "pallas" if a one-time check that the
            compiled zero-copy kernel loads a tiny pinned_host store correctly passes, else "xla"
            with a warning.

What runs on the CPU (jax 0.11.2, found by the experiments behind tests/test_kv_loader.py)
  * The "xla" path compiles and runs natively on the CPU with host_kv in `pinned_host` memory
    (dynamic_slice with device-resident scalar indices on a host array is accepted), bit-exact, and
    under jit with donated pools the compiled HLO has no copy of the pool.
  * The "pallas" path runs on the CPU only with interpret=True, which accepts `pinned_host`
    operands, bit-exact for normal numbers. Its compiled HLO is not representative of the GPU one
    (the interpreter copies the aliased pools), so the in-place check of the pallas path is done on
    the CUDA-lowered StableHLO (one `__gpu$xla.gpu.triton` custom call with
    `output_operand_aliases`) and on the GPU by bench/probe_offload.py.

Interpret-mode caveat: the CPU interpreter flushes bf16 subnormals to zero in the copies (XLA CPU
runs with denormals flushed); the "xla" path and the GPU kernel copy bits. Tests use normal values.
"""

from __future__ import annotations

import concurrent.futures
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lanes import next_pow2

PATHS = ("auto", "pallas", "xla")
UNROLL_MAX = 256  # the xla path unrolls its per-entry fetches up to this many entries, else fori_loop


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover - no backend
        return False


def loader_path(path: str = "auto") -> str:
    """The load_blocks implementation that `path` selects.

    "pallas" / "xla" are returned as given. "auto" -> "xla" off the GPU (the Triton kernel needs
    interpret=True there; the xla path runs natively on the CPU with pinned_host arrays). On the GPU,
    "pallas" (zero-copy reads of the pinned store) if a one-time check per process passes: a tiny
    `load_blocks(path="pallas")` from a pinned_host store, compared with NumPy (`_zero_copy_works`).
    If the kernel raises or loads wrong data, a warning with the reason is issued and "auto" is
    "xla" (dynamic_slice + device_put) for the rest of the process.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: expected one of {PATHS}")
    if path != "auto":
        return path
    return _gpu_auto_path() if _on_gpu() else "xla"


def _pallas_load(*args, **kwargs):
    """The loader the "auto" check runs (tests replace it)."""
    return load_blocks(*args, path="pallas", **kwargs)


def _zero_copy_works(load_fn=None) -> str | None:
    """Load one block with `load_fn` (default: load_blocks(path="pallas")) from a tiny pinned_host
    store (L=B=Hk=1, NB=2, bs=16, D=16, 1 slot), with a decode token in one of its rows (the form the
    decode step compiles), and compare K, V and bias with NumPy. Returns None if
    it is bit-exact, else why not (the exception text, or which outputs differ). Runs eagerly even
    when called while a jit is being traced (load_blocks resolves "auto" at trace time): it runs in a
    separate thread."""
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    load_fn = _pallas_load if load_fn is None else load_fn
    bs, D = 16, 16
    hk = (np.arange(2 * bs * D, dtype=np.float32).reshape(1, 1, 1, 2, bs, D) % 251 + 1).astype(jnp.bfloat16)
    hv = (-hk.astype(np.float32)).astype(jnp.bfloat16)
    hkv = np.stack([hk, hv], axis=4)  # [1, 1, 1, NB=2, 2, bs, D]
    cis = np.arange(2 * bs, dtype=np.float32).reshape(1, 1, 2 * bs, 1) + 0.5
    row = 3  # the token's row, inside the block loaded into slot 0
    tk = (np.arange(D, dtype=np.float32) + 300).reshape(1, 1, D).astype(jnp.bfloat16)
    tv = (-tk.astype(np.float32)).astype(jnp.bfloat16)
    tc = np.full((1, 1), 7.25, np.float32)

    def run():
        pin = SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
        out = load_fn(jax.device_put(hkv, pin), jnp.asarray(cis),
                      jnp.zeros((1, 1, bs, 1, D), jnp.bfloat16), jnp.zeros((1, 1, bs, 1, D), jnp.bfloat16),
                      jnp.zeros((1, 1, bs, 1), jnp.float32), jnp.int32(0), jnp.ones((1, 1, 1), jnp.int32),
                      jnp.zeros((1, 1, 1), jnp.int32), block_size=bs, new_k=jnp.asarray(tk), new_v=jnp.asarray(tv),
                      new_cis=jnp.asarray(tc), new_row=jnp.full((1, 1), row, jnp.int32))
        return [np.asarray(jax.device_get(o), np.float32) for o in out]

    try:
        # JAX's trace state is thread-local: in a fresh thread this runs eagerly even when the
        # caller is tracing a jit (ensure_compile_time_eval breaks the interpret-mode kernel).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            got = pool.submit(run).result()
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
        return f"{type(e).__name__}: {e}"
    want = [hk[0, 0, 0, 1].astype(np.float32)[None, None, :, None, :],
            hv[0, 0, 0, 1].astype(np.float32)[None, None, :, None, :], cis[:, :, bs:, :].copy()]
    for w, t in zip(want, (tk, tv, tc)):
        w[0, 0, row, 0] = t.astype(np.float32)[0, 0]
    bad = [name for name, g, w in zip(("pool_k", "pool_v", "pool_bias"), got, want)
           if g.shape != w.shape or not np.array_equal(g, w)]
    return f"wrong result in {', '.join(bad)} (compared with NumPy)" if bad else None


def _auto_path(load_fn=None) -> str:
    """"pallas" if `_zero_copy_works(load_fn)`, else "xla" with a warning giving the reason."""
    why = _zero_copy_works(load_fn)
    if why is None:
        return "pallas"
    warnings.warn(f"kv_loader: the zero-copy Pallas load from pinned_host memory FAILED its check ({why}); "
                  f"load_blocks(path='auto') uses the XLA dynamic_slice + device_put path instead "
                  f"(slower host->device loads)", RuntimeWarning, stacklevel=2)
    return "xla"


@functools.cache
def _gpu_auto_path() -> str:
    """`_auto_path()` once per process."""
    return _auto_path()


def _check_load_args(host_kv, cis, pool_k, pool_v, pool_bias, blocks, slots, block_size):
    if host_kv.ndim != 7 or host_kv.shape[4] != 2 or host_kv.shape[5] != block_size:
        raise ValueError(f"host_kv {host_kv.shape} must be [L, B, Hk, NB, 2, {block_size}, D] (K and V of each block)")
    L, B, Hk, NB, _, bs, D = host_kv.shape
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
    if host_kv.dtype != pool_k.dtype:
        raise ValueError(f"host dtype {host_kv.dtype} != pool dtype {pool_k.dtype}")
    return L, B, Hk, NB, bs, D, blocks.shape[2]


# ----------------------------------------------------------------------------------------------
# load_blocks
# ----------------------------------------------------------------------------------------------

def _load_kernel(layer_ref, blocks_ref, slots_ref, kv_ref, cis_ref, *refs, block_size: int, M: int, token: bool):
    """Program (b, h, m): entry m's block copy; with `token`, program m == M writes the new token's
    row unless an entry loaded that row's block this call (then the copy carries the token)."""
    if token:
        newk_ref, newv_ref, newc_ref, row_ref, _pk_in, _pv_in, _pb_in, pk_ref, pv_ref, pb_ref = refs
    else:
        _pk_in, _pv_in, _pb_in, pk_ref, pv_ref, pb_ref = refs
    b = pl.program_id(0)
    h = pl.program_id(1)
    m = pl.program_id(2)
    layer = layer_ref[0]
    row = row_ref[b, h] if token else None  # the new token's pool row, or -1
    k, v = jnp.int32(0), jnp.int32(1)  # typed indices (a Python int fails in the interpreter's discharge)

    def copy(blk):
        slot = slots_ref[b, h, m]
        dst = pl.ds(pl.multiple_of(slot * block_size, block_size), block_size)
        src = pl.ds(pl.multiple_of(blk * block_size, block_size), block_size)
        kt = pltriton.load(kv_ref.at[layer, b, h, blk, k, :, :])
        vt = pltriton.load(kv_ref.at[layer, b, h, blk, v, :, :])
        bt = pltriton.load(cis_ref.at[layer, b, src, h])
        if token:  # the token's row, if it lies in this block
            here = lax.broadcasted_iota(jnp.int32, (block_size,), 0) == row - slot * block_size
            kt = jnp.where(here[:, None], pltriton.load(newk_ref.at[b, h, :])[None, :], kt)
            vt = jnp.where(here[:, None], pltriton.load(newv_ref.at[b, h, :])[None, :], vt)
            bt = jnp.where(here, newc_ref[b, h], bt)
        # Plain loads/stores (`ref[...] = x` would lower to a swap that also reads the old contents).
        pltriton.store(pk_ref.at[layer, b, dst, h, :], kt)
        pltriton.store(pv_ref.at[layer, b, dst, h, :], vt)
        pltriton.store(pb_ref.at[layer, b, dst, h], bt)

    def entry():
        blk = blocks_ref[b, h, m]
        pl.when(blk >= 0)(lambda: copy(blk))

    if not token:
        entry()
        return
    pl.when(m < M)(entry)

    @pl.when((m == M) & (row >= 0))
    def _token():
        Mp = next_pow2(M)
        mm = lax.broadcasted_iota(jnp.int32, (Mp,), 0)
        inside = mm < M if M < Mp else None
        blks = pltriton.load(blocks_ref.at[b, h, pl.ds(0, Mp)], mask=inside, other=-1 if inside is not None else None)
        slts = pltriton.load(slots_ref.at[b, h, pl.ds(0, Mp)], mask=inside, other=-1 if inside is not None else None)
        loaded = jnp.max(jnp.where((blks >= 0) & (slts == row // block_size), 1, 0)) > 0

        @pl.when(~loaded)
        def _write():
            at = pl.ds(row, 1)
            pltriton.store(pk_ref.at[layer, b, at, h, :], pltriton.load(newk_ref.at[b, pl.ds(h, 1), :]))
            pltriton.store(pv_ref.at[layer, b, at, h, :], pltriton.load(newv_ref.at[b, pl.ds(h, 1), :]))
            pltriton.store(pb_ref.at[layer, b, at, h], pltriton.load(newc_ref.at[b, pl.ds(h, 1)]))



def _load_pallas(host_kv, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, token, *, block_size,
                 interpret, num_warps):
    B, Hk, M = blocks.shape
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    extra = () if token is None else (token[0], token[1], token[2].astype(jnp.float32), token[3].astype(jnp.int32))
    args = (layer_arr, blocks.astype(jnp.int32), slots.astype(jnp.int32), host_kv, cis, *extra,
            pool_k, pool_v, pool_bias)
    first = 5 + len(extra)  # the pools' operand index
    return pl.pallas_call(
        functools.partial(_load_kernel, block_size=block_size, M=M, token=token is not None),
        grid=(B, Hk, M + (token is not None)),
        in_specs=[any_spec] * len(args),
        out_specs=[any_spec] * 3,
        out_shape=[jax.ShapeDtypeStruct(pool_k.shape, pool_k.dtype),
                   jax.ShapeDtypeStruct(pool_v.shape, pool_v.dtype),
                   jax.ShapeDtypeStruct(pool_bias.shape, pool_bias.dtype)],
        input_output_aliases={first: 0, first + 1: 1, first + 2: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="nosa_kv_load_blocks",
    )(*args)


def _load_xla(host_kv, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, token, *, block_size,
              unroll_max=UNROLL_MAX):
    B, Hk, M = blocks.shape
    D = host_kv.shape[-1]
    T = pool_k.shape[2]
    N = B * Hk * M
    if N == 0:
        return _write_token(pool_k, pool_v, pool_bias, layer, token)
    layer = jnp.asarray(layer, jnp.int32)
    blocks = blocks.astype(jnp.int32)
    blk_c = jnp.maximum(blocks, 0).reshape(N)
    zero = jnp.int32(0)
    dev = jax.memory.Space.Device

    def fetch_one(e):
        b, h = e // (Hk * M), (e // M) % Hk
        start = (layer, jnp.asarray(b, jnp.int32), jnp.asarray(h, jnp.int32), blk_c[e], zero, zero, zero)
        x = lax.dynamic_slice(host_kv, start, (1, 1, 1, 1, 2, block_size, D))
        return jax.device_put(x, dev).reshape(1, 2, block_size, D)

    # One dynamic_slice + H2D transfer of K and V per entry (notes C.2, A2 unrolled / A fori_loop);
    # skipped entries fetch block 0 and are dropped by the scatter below.
    if N <= unroll_max:
        staged = jnp.concatenate([fetch_one(e) for e in range(N)], axis=0)
    else:
        def body(e, buf):
            return lax.dynamic_update_slice(buf, fetch_one(e), (e, zero, zero, zero))
        staged = lax.fori_loop(0, N, body, jnp.zeros((N, 2, block_size, D), host_kv.dtype), unroll=8)
    staged = staged.reshape(B, Hk, M, 2, block_size, D)

    i = jnp.arange(block_size, dtype=jnp.int32)
    # Destination rows; skipped entries point past the pool and are dropped (mode="drop"), so the
    # pool is never read and the scatter updates it in place.
    rows = jnp.where(blocks[..., None] >= 0, slots.astype(jnp.int32)[..., None] * block_size + i, T)  # [B,Hk,M,bs]
    b_idx = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h_idx = jnp.arange(Hk, dtype=jnp.int32)[None, :, None, None]
    pool_k = pool_k.at[layer, b_idx, rows, h_idx].set(staged[:, :, :, 0], mode="drop")
    pool_v = pool_v.at[layer, b_idx, rows, h_idx].set(staged[:, :, :, 1], mode="drop")
    src = jnp.maximum(blocks, 0)[..., None] * block_size + i
    bias = cis[layer, b_idx, src, h_idx]  # [B,Hk,M,bs] device gather from the score history
    pool_bias = pool_bias.at[layer, b_idx, rows, h_idx].set(bias, mode="drop")
    return _write_token(pool_k, pool_v, pool_bias, layer, token)


def _write_token(pool_k, pool_v, pool_bias, layer, token):
    """The new token's rows (token = (k, v, cis, row) or None) as three scatters; rows < 0 drop."""
    if token is None:
        return pool_k, pool_v, pool_bias
    new_k, new_v, new_cis, row = token
    B, Hk = row.shape
    at = (layer, jnp.arange(B)[:, None], jnp.where(row >= 0, row, pool_k.shape[2]), jnp.arange(Hk)[None, :])
    return (pool_k.at[at].set(new_k.astype(pool_k.dtype), mode="drop"),
            pool_v.at[at].set(new_v.astype(pool_v.dtype), mode="drop"),
            pool_bias.at[at].set(new_cis.astype(pool_bias.dtype), mode="drop"))


@functools.partial(jax.jit, static_argnames=("block_size", "path", "interpret", "num_warps", "xla_unroll_max"),
                   donate_argnames=("pool_k", "pool_v", "pool_bias"))
def load_blocks(host_kv, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, *, block_size: int,
                new_k=None, new_v=None, new_cis=None, new_row=None,
                path: str = "auto", interpret: bool = False, num_warps: int = 4,
                xla_unroll_max: int = UNROLL_MAX):
    """Copy host blocks into device pool slots, in place, then write the new token's rows. Returns
    (pool_k, pool_v, pool_bias).

    host_kv: [L, B, Hk, NB, 2, bs, D] (K, V; pinned_host, or device); cis: [L, B, T <= NB*bs, Hk] f32;
    pool_k, pool_v: [L, B, S*bs, Hk, D]; pool_bias: [L, B, S*bs, Hk] f32 (the three are donated);
    layer: int32 scalar (may be traced); blocks, slots: [B, Hk, M] int32. For every entry with
    blocks[b,h,m] >= 0: pool_{k,v}[layer, b, s*bs:(s+1)*bs, h] = host_kv[layer, b, h, blk, {0,1}] and
    pool_bias[layer, b, s*bs:(s+1)*bs, h] = cis[layer, b, blk*bs:(blk+1)*bs, h] with s = slots[b,h,m].
    Entries with blocks < 0 leave the pool untouched. Two entries of one (b, h) must not name the
    same slot. Then, given new_k, new_v [B, Hk, D], new_cis [B, Hk] and new_row [B, Hk] int32 (the
    decode step's token): for each (b, h) with new_row >= 0, row new_row of pool_{k,v} and pool_bias
    of `layer` gets the token (over a block copied there this call). The pallas path does it in the
    same kernel (a copy that holds the row carries the token; one more program per (b, h) writes it
    otherwise), the xla path with three scatters. path: "auto" | "pallas" | "xla" (see
    `loader_path`). interpret, num_warps: the pallas path's; xla_unroll_max: the xla path unrolls its
    B*Hk*M fetches up to this many, else fori_loop.
    """
    _check_load_args(host_kv, cis, pool_k, pool_v, pool_bias, blocks, slots, block_size)
    token = None if new_row is None else (new_k, new_v, new_cis, new_row)
    which = loader_path(path)
    if which == "pallas":
        return tuple(_load_pallas(host_kv, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, token,
                                  block_size=block_size, interpret=interpret, num_warps=num_warps))
    return _load_xla(host_kv, cis, pool_k, pool_v, pool_bias, layer, blocks, slots, token, block_size=block_size,
                     unroll_max=xla_unroll_max)
