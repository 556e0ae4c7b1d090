"""Block-sparse NOSA decode attention on the GPU: the Pallas kernel against its baselines.

Shapes: (Hq=32, Hk=2), (Hq=32, Hk=8) and the 1B model's (Hq=12, Hk=2; G=6 padded to 16 rows),
D=128, bf16; every (sequence, kv head) selects K=64 random distinct blocks of 64 tokens
(slots = ids) out of T=32768 tokens; q_pos = T-1 so every selected token is visible; batch 1, 16,
64. Methods, all timed in the same run (the "dense" and "kernel alone" numbers in the table mean:
dense moves 8x the bytes of the sparse methods; "alone" is the Pallas kernel without what XLA runs
around it: the jnp merge, or with merge=kernel the zero-fill of the split counter):
  kernel      pallas_kernels.sparse_decode.sparse_decode_attention, several (k_splits, num_warps,
              num_stages) settings, with the eviction bias (plus one run without it); merge=jnp (the
              splits merged by XLA after the kernel) and, beside the main settings, merge=kernel (the
              last program of each (b, kv head) merges inside the kernel)
  xla_gather  nosa_jax.nosa.gathered_block_attention(q, q_pos, k_pool[layer], ...), the model's path
  paged       jax.experimental.pallas.ops.gpu.paged_attention over the SAME selected blocks used as
              pages (each (b, kv head) is one "sequence" of 64 pages; pages_per_compute_block=4,
              num_stages=1, the settings that fit the H200's shared memory), no bias
  dense       jax.nn.dot_product_attention over the whole 32k context (cudnn, else xla), no bias
  read_*      the read ceiling at this size: what it costs only to read the selected K+V bytes, no
              attention. read_gather: a Triton kernel with the Pallas kernel's grid (B, Hk, k_splits),
              blocks and warps, summing the same blocks of the same [L, B, T, Hk, D] pools;
              read_headmajor: the same kernel on [L, B, Hk, T, D] pools (each block one contiguous
              16 KiB run); read_contig_xla: XLA's sum of one contiguous buffer of the same bytes;
              copy_contig_xla: XLA's copy of that buffer (bytes read + written). A target above the
              best of these is above what any kernel that reads these bytes can reach at this size.

Timing: each timed function is one jit that makes R calls in a row (Python-unrolled), call r reading
layer r % L of a stacked [L, B, T, Hk, D] pool through a traced layer index, each call's output
being the next call's query (so nothing can be hoisted or overlapped). L is chosen so the R calls
touch >= ~3x the 50 MB L2 where memory allows (B=1 still partly fits: see the `ws_MB` column).
Device time = sum of the GPU kernel times (CUPTI, `jax.experimental.mosaic.gpu.profiler.measure`),
median over repeats, divided by R; if CUPTI is unavailable, wall time of the blocked call / R.

Effective bandwidth = bytes that must move / time, with bytes = selected K+V (B*Hk*K*64*D*2*2) +
bias (B*Hk*K*64*4, bias runs only) + q + out (B*Hq*D*2 each); for `dense` its own K+V (B*T*Hk*D*4).
The roofline is the H200's ~4.3 TB/s device copy ceiling (notes A.5).

    PYTHONPATH=. python3 bench/kernels_decode.py [--quick]
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from bench.common import record, standalone  # noqa: E402
from nosa_jax import nosa  # noqa: E402
from pallas_kernels.sparse_decode import (default_k_splits, sparse_decode_attention,  # noqa: E402
                                          sparse_decode_attention_reference)

D, BS, K, T = 128, 64, 64, 32768
SHAPES = ((32, 2), (32, 8), (12, 2))
BATCHES = (1, 16, 64)
PEAK = 4.3e12  # bytes/s
L2 = 50 * 2**20
HEADER = ["Hq/Hk", "B", "method", "settings", "us/call", "TB/s", "% of 4.3", "ws_MB", "rel_err", "timing"]

_CUPTI_OK = [True]


def device_time(fn, args, calls: int, repeats: int, kernel_substr: str | tuple[str, ...] | None = None):
    """(seconds per call, kernel-only seconds per call or None, how) for the jitted `fn(*args)`;
    kernel-only: the kernels whose names contain `kernel_substr` (or one of them)."""
    subs = (kernel_substr,) if isinstance(kernel_substr, str) else kernel_substr
    jax.block_until_ready(fn(*args))  # compile + warm up
    if _CUPTI_OK[0]:
        try:
            from jax.experimental.mosaic.gpu import profiler
            _, per_iter = profiler.measure(fn, aggregate=False, iterations=repeats)(*args)
            if per_iter:
                totals = [sum(t for _, t in it) for it in per_iter]
                kern = None
                if kernel_substr:
                    ks = [sum(t for n, t in it if any(x in n for x in subs)) for it in per_iter]
                    kern = statistics.median(ks) / 1e3 / calls if any(ks) else None
                return statistics.median(totals) / 1e3 / calls, kern, "cupti"
        except Exception as e:  # noqa: BLE001
            print(f"  CUPTI timing unavailable ({type(e).__name__}: {e}); falling back to wall time", flush=True)
            _CUPTI_OK[0] = False
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / calls, None, "wall"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _read_kernel(layer_ref, ids_ref, k_ref, v_ref, o_ref, *, block_size: int, per_split: int,
                 head_major: bool):
    """Program (b, h, s) of `read_blocks`: the K and V blocks of entries s*E .. s*E+E-1, summed."""
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    bs, D = block_size, k_ref.shape[-1]

    def body(i, acc):
        tok = pl.ds(pl.multiple_of(ids_ref[b, h, s * per_split + i] * bs, bs), bs)
        at = (layer, b, h, tok, slice(None)) if head_major else (layer, b, tok, h, slice(None))
        k = pltriton.load(k_ref.at[at])
        v = pltriton.load(v_ref.at[at])
        return acc + k.astype(jnp.float32) + v.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, per_split, body, jnp.zeros((bs, D), jnp.float32))
    pltriton.store(o_ref.at[b, h, s, :], jnp.sum(acc, axis=0))


def read_blocks(k_pool, v_pool, ids, layer, *, k_splits: int, block_size: int = BS, head_major: bool = False,
                num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Sum over the blocks ids[b, h] (of block_size tokens) of K + V, per split: [B, Hk, k_splits, D] float32.
    Pools [L, B, T, Hk, D] (or [L, B, Hk, T, D] with head_major). The read ceiling's kernel: the
    Pallas decode kernel's grid and loads without its math. K must be a multiple of k_splits."""
    B, Hk, Kn = ids.shape
    D = k_pool.shape[-1]
    if Kn % k_splits:
        raise ValueError(f"read_blocks: K={Kn} is not a multiple of k_splits={k_splits}")
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_read_kernel, block_size=block_size, per_split=Kn // k_splits, head_major=head_major),
        grid=(B, Hk, k_splits),
        in_specs=[any_spec] * 4,
        out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct((B, Hk, k_splits, D), jnp.float32),
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="read_ceiling",
    )(jnp.asarray(layer, jnp.int32).reshape(1), ids, k_pool, v_pool)


def _read_ceilings(k_pool, v_pool, ids, layers, ks: int, R: int, L: int, repeats: int, nbytes: int, emit, fail):
    """The read_* rows (module docstring): the same bytes read with no attention math."""
    Kn = ids.shape[-1]
    splits = ks if Kn % ks == 0 else 1
    variants = [(False, splits, 2), (False, splits, 3), (True, splits, 2)]
    if Kn % (2 * splits) == 0:
        variants.append((False, 2 * splits, 2))
    for head_major, sp, stages in variants:
        method = "read_headmajor" if head_major else "read_gather"
        settings = {"k_splits": sp, "num_warps": 4, "num_stages": stages}
        kp, vp = ((jnp.swapaxes(k_pool, 2, 3), jnp.swapaxes(v_pool, 2, 3)) if head_major else (k_pool, v_pool))

        def fn(kp, vp, ids, layers, head_major=head_major, sp=sp, stages=stages):
            return [read_blocks(kp, vp, ids, layers[r], k_splits=sp, head_major=head_major, num_stages=stages)
                    for r in range(R)]

        try:
            secs, _, how = device_time(jax.jit(fn), (kp, vp, ids, layers), R, repeats)
            emit(method, settings, secs, None, how, nbytes)
        except Exception as e:  # noqa: BLE001
            fail(method, settings, e)
        del kp, vp
    # One buffer per call: XLA computes identical reductions once (session 25's first run reused L
    # buffers over R > L calls and timed R - L fewer reads than it divided by).
    rows = nbytes // 2 // 4096
    n = max(4, min(R, L))
    bufs = [jnp.full((rows, 4096), i + 1, jnp.bfloat16) for i in range(n)]

    def sum_fn(bufs):
        return [jnp.sum(b, dtype=jnp.float32) for b in bufs]

    def copy_fn(bufs):
        return [b * 2 for b in bufs]

    for method, fn, moved in (("read_contig_xla", sum_fn, rows * 4096 * 2), ("copy_contig_xla", copy_fn,
                                                                              2 * rows * 4096 * 2)):
        try:
            secs, _, how = device_time(jax.jit(fn), (bufs,), n, repeats)
            emit(method, {"bytes_moved": moved}, secs, None, how, moved)
        except Exception as e:  # noqa: BLE001
            fail(method, {}, e)
    del bufs


def _one_config(Hq: int, Hk: int, B: int, quick: bool, records: list, rows: list, repeats: int):
    G = Hq // Hk
    nb = T // BS
    sel_bytes = B * Hk * K * BS * D * 2 * 2
    bias_bytes = B * Hk * K * BS * 4
    qo_bytes = 2 * B * Hq * D * 2
    layer_bytes = B * T * Hk * D * 2 * 2  # one layer of K+V
    # layers so that the R calls touch >= ~3 L2 of selected data, bounded by pool memory (<= 16 GiB)
    L = max(1, min(16, math.ceil(3 * L2 / sel_bytes), max(1, (16 << 30) // layer_bytes)))
    R = max(4, L)
    ws_mb = min(R, L) * sel_bytes / 2**20
    base = {"Hq": Hq, "Hk": Hk, "batch": B, "head_dim": D, "block": BS, "K": K, "T": T, "dtype": "bfloat16",
            "layers_in_pool": L, "calls_per_timing": R, "repeats": repeats}
    tag = f"{Hq}/{Hk}"
    print(f"== Hq={Hq} Hk={Hk} B={B}: pool L={L} ({L * layer_bytes / 2**30:.2f} GiB K+V), R={R} calls, "
          f"selected {sel_bytes / 2**20:.1f} MiB/call", flush=True)

    key = jax.random.key(1000 * B + Hk)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    k_pool = jax.random.normal(k1, (L, B, T, Hk, D), jnp.bfloat16)
    v_pool = jax.random.normal(k2, (L, B, T, Hk, D), jnp.bfloat16)
    bias_pool = jax.random.normal(k3, (L, B, T, Hk), jnp.float32)
    q = jax.random.normal(k4, (B, Hq, D), jnp.bfloat16)
    rng = np.random.default_rng(B * 31 + Hk)
    ids_np = np.stack([np.stack([np.sort(rng.choice(nb, K, replace=False)) for _ in range(Hk)])
                       for _ in range(B)]).astype(np.int32)
    ids = jnp.asarray(ids_np)
    q_pos = jnp.full((B,), T - 1, jnp.int32)
    layers = jnp.arange(R, dtype=jnp.int32) % L

    def emit(method, settings, secs, kern, how, nbytes, err=float("nan")):
        s = {**base, **settings, "timing": how}
        bw = nbytes / secs
        records.append(record(f"sparse_decode/{method}", s, "time_per_call", secs * 1e6, "us"))
        records.append(record(f"sparse_decode/{method}", s, "effective_bandwidth", bw / 1e12, "TB/s"))
        records.append(record(f"sparse_decode/{method}", s, "fraction_of_4.3TBps", bw / PEAK, "ratio"))
        if kern:
            records.append(record(f"sparse_decode/{method}", s, "kernel_only_time_per_call", kern * 1e6, "us"))
        if err == err:
            records.append(record(f"sparse_decode/{method}", s, "rel_err_vs_reference", err, "ratio"))
        desc = ", ".join(f"{k}={v}" for k, v in settings.items())
        if kern:
            desc += f" (pallas kernel alone {kern * 1e6:.1f} us)"
        row = [tag, B, method, desc, f"{secs * 1e6:.1f}", f"{bw / 1e12:.2f}", f"{100 * bw / PEAK:.0f}",
               f"{ws_mb:.0f}", "" if err != err else f"{err:.1e}", how]
        rows.append(row)
        print("  ", row, flush=True)

    def fail(method, settings, e):
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  {method} {settings} FAILED: {msg}", flush=True)
        traceback.print_exc(limit=3)
        records.append(record(f"sparse_decode/{method}", {**base, **settings, "error": msg}, "failed", 1, "flag"))
        rows.append([tag, B, method, ", ".join(f"{k}={v}" for k, v in settings.items()), "FAILED", "", "", "",
                     msg[:60], ""])

    # ---- reference output of one call (layer 0) for the error column
    ref0 = sparse_decode_attention_reference(q, k_pool, v_pool, bias_pool, ids, ids, q_pos, jnp.int32(0),
                                             block_size=BS)

    # ---- the Pallas kernel
    ks0 = default_k_splits(B, Hk, K)
    variants = [(ks0, 4, 2, True, "jnp"), (ks0, 4, 2, True, "kernel"), (ks0, 8, 2, True, "jnp"),
                (min(K, 2 * ks0), 4, 2, True, "jnp"), (min(K, 2 * ks0), 4, 2, True, "kernel")]
    if not quick:
        variants += [(ks0, 4, 3, True, "jnp"), (ks0, 4, 1, True, "jnp"), (max(1, ks0 // 2), 4, 2, True, "jnp"),
                     (K, 4, 2, True, "jnp"), (K, 4, 2, True, "kernel"), (ks0, 4, 2, False, "jnp"),
                     (ks0, 4, 2, False, "kernel")]
    seen, checked = set(), set()
    for ks, nw, ns, with_bias, merge in variants:
        splits = -(-K // -(-K // ks))
        if splits == 1:
            merge = "jnp"  # one split: nothing to merge, both are the same kernel
        if (ks, nw, ns, with_bias, merge) in seen:
            continue
        seen.add((ks, nw, ns, with_bias, merge))
        settings = {"k_splits": ks, "num_warps": nw, "num_stages": ns, "bias": with_bias, "merge": merge,
                    "programs": B * Hk * splits}

        def kern_fn(q, k_pool, v_pool, bias_pool, ids, q_pos, layers, ks=ks, nw=nw, ns=ns, merge=merge):
            for r in range(R):
                q = sparse_decode_attention(q, k_pool, v_pool, bias_pool, ids, ids, q_pos, layers[r],
                                            block_size=BS, k_splits=ks, num_warps=nw, num_stages=ns, merge=merge)
            return q

        try:
            bp = bias_pool if with_bias else None
            err = float("nan")
            if (merge, with_bias) not in checked:  # accuracy once per code path (the GPU tests cover the settings)
                checked.add((merge, with_bias))
                one = sparse_decode_attention(q, k_pool, v_pool, bp, ids, ids, q_pos, jnp.int32(0),
                                              block_size=BS, k_splits=ks, num_warps=nw, num_stages=ns, merge=merge)
                ref = ref0 if with_bias else sparse_decode_attention_reference(
                    q, k_pool, v_pool, None, ids, ids, q_pos, jnp.int32(0), block_size=BS)
                err = _rel(one, ref)
                del one, ref
            secs, kern, how = device_time(jax.jit(kern_fn), (q, k_pool, v_pool, bp, ids, q_pos, layers), R,
                                          repeats, kernel_substr="sparse_decode")
            emit("pallas_kernel", settings, secs, kern, how, sel_bytes + qo_bytes + (bias_bytes if with_bias else 0),
                 err)
        except Exception as e:  # noqa: BLE001
            fail("pallas_kernel", settings, e)

    # ---- the read ceiling at this size (no attention math)
    _read_ceilings(k_pool, v_pool, ids, layers, ks0, R, L, repeats, sel_bytes, emit, fail)

    # ---- the Mosaic GPU backend of the same kernel (TMA + wgmma), default split
    mg_settings = {"backend": "mosaic", "k_splits": ks0, "bias": True}

    def mosaic_fn(q, k_pool, v_pool, bias_pool, ids, q_pos, layers):
        for r in range(R):
            q = sparse_decode_attention(q, k_pool, v_pool, bias_pool, ids, ids, q_pos, layers[r],
                                        block_size=BS, k_splits=ks0, backend="mosaic")
        return q

    try:
        one = sparse_decode_attention(q, k_pool, v_pool, bias_pool, ids, ids, q_pos, jnp.int32(0),
                                      block_size=BS, k_splits=ks0, backend="mosaic")
        err = _rel(one, ref0)
        del one
        secs, _, how = device_time(jax.jit(mosaic_fn), (q, k_pool, v_pool, bias_pool, ids, q_pos, layers), R,
                                   repeats)
        emit("pallas_mosaic", mg_settings, secs, None, how, sel_bytes + bias_bytes + qo_bytes, err)
    except Exception as e:  # noqa: BLE001
        fail("pallas_mosaic", mg_settings, e)

    # ---- XLA gather + einsum (the model's current decode path)
    def xla_fn(q, k_pool, v_pool, bias_pool, ids, q_pos, layers):
        for r in range(R):
            lyr = layers[r]
            q = nosa.gathered_block_attention(q, q_pos, k_pool[lyr], v_pool[lyr], bias_pool[lyr], ids, BS)
        return q

    try:
        one = nosa.gathered_block_attention(q, q_pos, k_pool[0], v_pool[0], bias_pool[0], ids, BS)
        err = _rel(one, ref0)
        del one
        secs, _, how = device_time(jax.jit(xla_fn), (q, k_pool, v_pool, bias_pool, ids, q_pos, layers), R, repeats)
        emit("xla_gather", {"bias": True}, secs, None, how, sel_bytes + bias_bytes + qo_bytes, err)
    except Exception as e:  # noqa: BLE001
        fail("xla_gather", {"bias": True}, e)

    # ---- jax's Triton paged attention over the same blocks (pages), no bias
    pa_ks = min(16, 1 << max(0, round(math.log2(max(1, ks0)))))
    pa_settings = {"k_splits": pa_ks, "pages_per_compute_block": 4, "num_stages": 1, "num_warps": 8,
                   "bias": False}
    k_pages = v_pages = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        # page (l, b, h, j) of the pool -> page ((l*B + b)*Hk + h)*nb + j of a [1, P, 64, D] page pool
        k_pages = jnp.transpose(k_pool, (0, 1, 3, 2, 4)).reshape(1, L * B * Hk * nb, BS, D)
        v_pages = jnp.transpose(v_pool, (0, 1, 3, 2, 4)).reshape(1, L * B * Hk * nb, BS, D)
        seq = (jnp.arange(B)[:, None] * Hk + jnp.arange(Hk)[None, :]).reshape(1, B * Hk, 1)
        tables = ((jnp.arange(L)[:, None, None] * B * Hk + seq) * nb + ids.reshape(1, B * Hk, K)).astype(jnp.int32)
        lengths = jnp.full((B * Hk,), K * BS, jnp.int32)

        def pa_fn(q, k_pages, v_pages, tables, lengths, layers):
            for r in range(R):
                qs = (q * (1.0 / math.sqrt(D))).astype(q.dtype)  # jax's kernel applies no 1/sqrt(D) itself
                o = paged_attention(qs.reshape(B * Hk, G, D), k_pages, v_pages, tables[layers[r]], lengths,
                                    pages_per_compute_block=4, k_splits=pa_ks, num_stages=1, num_warps=8)
                q = o.reshape(B, Hq, D)
            return q

        qs = (q * (1.0 / math.sqrt(D))).astype(q.dtype)
        o1 = paged_attention(qs.reshape(B * Hk, G, D), k_pages, v_pages, tables[0], lengths,
                             pages_per_compute_block=4, k_splits=pa_ks, num_stages=1, num_warps=8)
        err = _rel(o1.reshape(B, Hq, D), sparse_decode_attention_reference(
            q, k_pool, v_pool, None, ids, ids, q_pos, jnp.int32(0), block_size=BS))
        del o1
        secs, _, how = device_time(jax.jit(pa_fn), (q, k_pages, v_pages, tables, lengths, layers), R, repeats)
        emit("jax_paged_attention", pa_settings, secs, None, how, sel_bytes + qo_bytes, err)
    except Exception as e:  # noqa: BLE001
        fail("jax_paged_attention", pa_settings, e)
    del k_pages, v_pages

    # ---- dense attention over the whole context (cudnn, else xla), no bias
    Ld = max(1, min(L, math.ceil(3 * L2 / layer_bytes)))
    dense_k = [k_pool[i] for i in range(Ld)]  # standalone per-layer arrays (no slicing in the timed fn)
    dense_v = [v_pool[i] for i in range(Ld)]
    del k_pool, v_pool, bias_pool
    Rd = max(2, Ld)
    for impl in ("cudnn", "xla"):
        settings = {"implementation": impl, "context": T, "bias": False}

        def dense_fn(q, ks_, vs_, impl=impl):
            for r in range(Rd):
                o = jax.nn.dot_product_attention(q[:, None], ks_[r % Ld], vs_[r % Ld], implementation=impl)
                q = o[:, 0]
            return q

        try:
            secs, _, how = device_time(jax.jit(dense_fn), (q, dense_k, dense_v), Rd, repeats)
            emit("dense_dot_product_attention", settings, secs, None, how, layer_bytes + qo_bytes)
            break
        except Exception as e:  # noqa: BLE001
            fail("dense_dot_product_attention", settings, e)
    del dense_k, dense_v


def run(records: list, quick: bool = False) -> list:
    """Benchmark on the GPU; appends `bench.common.record`s to `records`, returns table rows (HEADER)."""
    if jax.devices()[0].platform != "gpu":
        raise RuntimeError("bench/kernels_decode.py needs a GPU")
    rows: list = []
    repeats = 5 if quick else 7
    batches = (16,) if quick else BATCHES
    t0 = time.perf_counter()
    for Hq, Hk in SHAPES:
        for B in batches:
            try:
                _one_config(Hq, Hk, B, quick, records, rows, repeats)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
                print(f"config Hq={Hq} Hk={Hk} B={B} FAILED: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(limit=5)
                rows.append([f"{Hq}/{Hk}", B, "(config)", "", "FAILED", "", "", "", type(e).__name__, ""])
            print(f"   elapsed {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


if __name__ == "__main__":
    standalone(run, HEADER, "kernels_decode")
