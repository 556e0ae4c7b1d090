"""Prefill attention: the block-sparse Pallas kernel (pallas_kernels/sparse_prefill.py) vs dense flash.

One sequence, 32 query / 2 kv heads, head_dim 128, bf16, blocks of 64, K = 64 selected blocks per
(token, kv head), a float32 NOSA bias, a 2-layer stacked pool (layer 1 read). Cases:
  prompt32k   the whole 32K prompt as ONE chunk (q_pos 0..32767)
  chunk4k@28k a 4096-token chunk at position 28672 of the 32K context (the model's chunked prefill)
Selections follow NOSA's pattern (`nosa_like_selection`): the sink block and the 16-block local
window are forced; 'shared' = the tokens of a 64-token query block pick identical sets (best case
for the per-tile union), 'nosa' = NOSA's two-stage top-k (33 query-aware picks with per-token
jitter, filled to 64 by a query-agnostic ranking), 'indep' = every token picks independently (worst
case); ascending, -1 padded.
Dense baselines on the same 32K prompt: `jax.nn.dot_product_attention(..., is_causal=True,
implementation="cudnn")` (the target), the jax Pallas Triton flash attention (same backend as our
kernel, K/V repeated to 32 heads), and XLA only where it fits.

Metrics: device time (CUPTI, median over iterations after warm-up; wall clock if CUPTI is missing)
of the whole jitted call (tile-union preprocessing + kernel) and of the Pallas kernel alone;
ns per (query head, visible selected key) pair for sparse, ns per (query head, causal key) pair for
dense; the issue's target is sparse <= 1.5x dense (cuDNN) per pair. `computed/selected` = pairs the
kernel actually scores (tile union x rows) / pairs selected (the union's overhead).

    python bench/kernels_prefill.py [--quick] [--sweep]
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import record, standalone
from pallas_kernels.sparse_prefill import default_tile_q, sparse_prefill_attention

NAME = "kernels_prefill"
HQ, HK, D, BS, K, L, LAYER = 32, 2, 128, 64, 64, 2, 1
CONTEXT = 32768
T_POOL = CONTEXT + BS  # cache.allocation adds a window of slack, rounded to blocks
HEADER = ["case", "impl", "settings", "time (ms)", "kernel (ms)", "ns / pair", "vs cuDNN / pair",
          "computed/selected", "TFLOP/s (selected)"]
SWEEP = [dict(tile_q=4, num_warps=4, num_stages=3), dict(tile_q=4, num_warps=4, num_stages=4),
         dict(tile_q=4, num_warps=8, num_stages=2), dict(tile_q=2, num_warps=4, num_stages=2),
         dict(tile_q=8, num_warps=4, num_stages=2), dict(tile_q=8, num_warps=8, num_stages=2)]


# ------------------------------------------------------------------ inputs

def nosa_like_selection(rng, q_pos: np.ndarray, n_blocks: int, pattern: str, *, jitter: float = 0.5,
                        init_blocks: int = 1, local_blocks: int = 16, qk_select: int = 33):
    """[1, Hk, Tc, K] int32 ids shaped like NOSA's two-stage top-k (spec 2.7), ascending, -1 padded.

    The sink block and the local window (the query's block and the 16 before it) are forced.
      'shared': the other picks are the top of random scores shared by the 64 tokens of a query
                block (neighbouring tokens select identical sets: the best case for tile unions);
      'nosa':   stage 1 takes the top `qk_select` of query-aware scores (shared per query block plus
                `jitter` x per-token noise), stage 2 fills up to K with a query-AGNOSTIC ranking
                (one random score per block for the whole sequence), as NOSA's cis ranking does;
      'indep':  every token picks its other blocks independently (worst case for tile unions).
    """
    Tc = q_pos.shape[0]
    qb = q_pos // BS
    ids = np.full((1, HK, Tc, K), -1, np.int32)
    j = np.arange(n_blocks)
    uq, inv = np.unique(qb, return_inverse=True)
    chunk = 4096  # rows at a time (bounded host memory)

    def top(s, k):
        return np.argpartition(-s, k - 1, axis=1)[:, :k]

    for h in range(HK):
        base = rng.random((len(uq), n_blocks), dtype=np.float32)
        cis = rng.random(n_blocks, dtype=np.float32)
        for s0 in range(0, Tc, chunk):
            sl = slice(s0, min(Tc, s0 + chunk))
            n = sl.stop - sl.start
            q = qb[sl][:, None]
            forced = (j[None] < init_blocks) | ((j[None] <= q) & (q <= j[None] + local_blocks))
            future = j[None] > q
            if pattern == "indep":
                s = rng.random((n, n_blocks), dtype=np.float32)
            elif pattern == "shared":
                s = base[inv[sl]]
            elif pattern == "nosa":
                s1 = base[inv[sl]] + np.float32(jitter) * rng.random((n, n_blocks), dtype=np.float32)
                s1 = np.where(forced, np.inf, np.where(future, -np.inf, s1))
                picked = np.zeros((n, n_blocks), bool)
                np.put_along_axis(picked, top(s1, min(qk_select, n_blocks)), True, axis=1)
                s = np.where(picked, np.inf, np.broadcast_to(cis, (n, n_blocks)))
            else:
                raise ValueError(pattern)
            s = np.where(forced, np.inf, np.where(future, -np.inf, s))
            t = np.sort(top(s, K), axis=1)
            ids[0, h, sl] = np.where(t > q, -1, t)
    return ids


def selected_pairs(ids: np.ndarray, q_pos: np.ndarray, kv_len: int) -> int:
    """Sum over (kv head, token) of visible selected keys, times G (= query-head pairs)."""
    start = ids.astype(np.int64) * BS
    lim = np.minimum(q_pos, kv_len - 1)[None, None, :, None]  # [1, 1, Tc, 1]
    n = np.clip(lim - start + 1, 0, BS)
    n = np.where(ids >= 0, n, 0)
    return int(n.sum()) * (HQ // HK)


def computed_pairs(ids: np.ndarray, tile_q: int) -> int:
    """Pairs the kernel scores: per tile, union size x block x (tile_q x G) rows."""
    _, Hk, Tc, _ = ids.shape
    nT = -(-Tc // tile_q)
    tot = 0
    for h in range(Hk):
        x = np.full((nT * tile_q, K), -1, np.int64)
        x[:Tc] = ids[0, h]
        x = np.sort(x.reshape(nT, tile_q * K), axis=1)
        distinct = (x >= 0) & np.concatenate([np.ones((nT, 1), bool), x[:, 1:] != x[:, :-1]], axis=1)
        tot += int(distinct.sum())
    return tot * BS * tile_q * (HQ // HK)


def make_pool(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape = (L, 1, T_POOL, HK, D)
    k = jax.random.normal(k1, shape, jnp.bfloat16)
    v = jax.random.normal(k2, shape, jnp.bfloat16)
    bias = jax.random.normal(k3, shape[:4], jnp.float32)
    q = jax.random.normal(k4, (1, CONTEXT, HQ, D), jnp.bfloat16)
    return q, k, v, bias


# ------------------------------------------------------------------ timing

def device_time(fn, args, iters: int, kernel_substr: str | None = None):
    """(median ms of the whole call, median ms of kernels whose name contains kernel_substr, method).

    CUPTI device time (jax.experimental.mosaic.gpu.profiler.measure) when available, else the
    median wall time of blocking calls (then the kernel time is None)."""
    jf = jax.jit(fn)
    jax.block_until_ready(jf(*args))  # compile + warm-up
    try:
        from jax.experimental.mosaic.gpu import profiler
        _, per_iter = profiler.measure(jf, aggregate=False, iterations=iters)(*args)
        if not per_iter:
            raise RuntimeError("no kernels recorded")
        totals = [sum(t for _, t in it) for it in per_iter]
        kern = None
        if kernel_substr:
            ks = [sum(t for n, t in it if kernel_substr in n) for it in per_iter]
            kern = statistics.median(ks) if any(ks) else None
        return statistics.median(totals), kern, "cupti"
    except Exception as e:  # noqa: BLE001
        print(f"  (CUPTI timing unavailable: {type(e).__name__}: {e}; using wall clock)", flush=True)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(jf(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, None, "wall"


# ------------------------------------------------------------------ benchmark

def _dense_impls(q, k, v):
    """[(label, fn)] dense causal flash attention over the whole prompt (bias-free)."""
    impls = []

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    impls.append(("cudnn", cudnn))
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as pl_attn

        def pallas_mha(q, k, v):
            G = q.shape[2] // k.shape[2]
            kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
            # positional: (q, k, v, segment_ids, sm_scale, causal, block_sizes, bwd impl, num_warps, num_stages)
            return pl_attn.mha(q, kk, vv, None, 1.0 / np.sqrt(D), True, pl_attn.BlockSizes(block_q=128, block_k=64),
                               "triton", 8, 2)

        impls.append(("pallas-triton-mha", pallas_mha))
    except Exception as e:  # noqa: BLE001
        print(f"  (jax pallas mha unavailable: {e})")
    return impls


def run(records: list, quick: bool = False, sweep: bool = False) -> list[list]:
    rows: list[list] = []
    iters = 5 if quick else 10
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    if not on_gpu:
        rows.append(["-", "-", "-", "SKIPPED: needs a CUDA GPU", "-", "-", "-", "-", "-"])
        return rows
    try:
        q_full, k_pool, v_pool, bias_pool = make_pool(jax.random.key(0))
    except Exception as e:  # noqa: BLE001
        rows.append(["inputs", "-", "-", f"FAILED: {type(e).__name__}: {e}"[:160], "-", "-", "-", "-", "-"])
        return rows
    base = dict(context=CONTEXT, hq=HQ, hk=HK, head_dim=D, block_size=BS, topk=K, dtype="bfloat16")

    # ---- dense baselines (whole 32K prompt, causal)
    dense_pairs = HQ * CONTEXT * (CONTEXT + 1) // 2
    dense_ns = {}
    k_dense = k_pool[LAYER]
    v_dense = v_pool[LAYER]
    kd, vd = k_dense[:, :CONTEXT], v_dense[:, :CONTEXT]
    for label, fn in _dense_impls(q_full, kd, vd):
        try:
            ms, _, how = device_time(fn, (q_full, kd, vd), iters)
            ns = ms * 1e6 / dense_pairs
            dense_ns[label] = ns
            tflops = 4 * D * dense_pairs / (ms * 1e-3) / 1e12
            s = dict(base, case="prompt32k", impl=label, timing=how)
            records.append(record(f"{NAME}/dense/{label}", s, "time", ms, "ms"))
            records.append(record(f"{NAME}/dense/{label}", s, "time_per_pair", ns, "ns"))
            records.append(record(f"{NAME}/dense/{label}", s, "tflops", tflops, "TFLOP/s"))
            rows.append(["prompt32k", f"dense {label}", "causal", f"{ms:.3f}", "-", f"{ns:.5f}", "-", "1.00",
                         f"{tflops:.0f}"])
        except Exception as e:  # noqa: BLE001
            rows.append(["prompt32k", f"dense {label}", "causal", f"FAILED: {type(e).__name__}: {e}"[:200],
                         "-", "-", "-", "-", "-"])
            traceback.print_exc()
    ref_ns = dense_ns.get("cudnn") or next(iter(dense_ns.values()), None)
    ref_name = "cudnn" if "cudnn" in dense_ns else next(iter(dense_ns), "none")

    # ---- sparse kernel
    cases = [("prompt32k", 0, CONTEXT), ("chunk4k@28k", CONTEXT - 4096, 4096)]
    patterns = ["nosa"] if quick else ["shared", "nosa", "indep"]
    variants = [{}] + (SWEEP if sweep else [])
    rng = np.random.default_rng(0)
    attn_ms: dict[str, float] = {}  # the sparse attention's time per case (pattern nosa, default tiling)
    for case, start, Tc in cases:
        q_pos_np = np.arange(start, start + Tc, dtype=np.int32)
        q = q_full[:, start:start + Tc]
        q_pos = jnp.asarray(q_pos_np)[None]
        kv_len = jnp.asarray([start + Tc], jnp.int32)
        layer = jnp.int32(LAYER)
        runs = [(p, v) for p in patterns for v in (variants if p == "nosa" else [{}])]
        runs += [("shared", dict(tile_q=8, num_warps=4))] if sweep and not quick else []
        runs += [("dense-mode", {})] if case == "prompt32k" and not quick else []
        for pattern, kw in runs:
            label = "full (block_ids=None)" if pattern == "dense-mode" else f"sparse {pattern}"
            tq = kw.get("tile_q", default_tile_q(HQ // HK, Tc))
            sett = ",".join(f"{a}={b}" for a, b in dict(dict(tile_q=tq), **kw).items())
            try:
                if pattern == "dense-mode":
                    ids = None
                    pairs = HQ * int(np.minimum(q_pos_np + 1, start + Tc).sum())
                    comp = "-"
                else:
                    ids_np = nosa_like_selection(rng, q_pos_np, T_POOL // BS, pattern)
                    ids = jnp.asarray(ids_np)
                    pairs = selected_pairs(ids_np, q_pos_np, start + Tc)
                    comp = f"{computed_pairs(ids_np, tq) / pairs:.2f}"

                def fn(q, q_pos, k_pool, v_pool, bias_pool, ids, kv_len, layer, kw=kw):
                    return sparse_prefill_attention(q, q_pos, k_pool, v_pool, bias_pool, ids, kv_len, layer,
                                                    block_size=BS, **kw)

                ms, kern_ms, how = device_time(fn, (q, q_pos, k_pool, v_pool, bias_pool, ids, kv_len, layer), iters,
                                               kernel_substr="nosa_sparse_prefill")
                t_k = kern_ms if kern_ms else ms
                ns = t_k * 1e6 / pairs
                ratio = ns / ref_ns if ref_ns else float("nan")
                tflops = 4 * D * pairs / (t_k * 1e-3) / 1e12
                s = dict(base, case=case, chunk=Tc, start=start, impl="pallas", pattern=pattern, timing=how,
                         selected_pairs=pairs, **{a: str(b) for a, b in dict(dict(tile_q=tq), **kw).items()})
                records.append(record(f"{NAME}/sparse", s, "time", ms, "ms"))
                if kern_ms:
                    records.append(record(f"{NAME}/sparse", s, "kernel_time", kern_ms, "ms"))
                records.append(record(f"{NAME}/sparse", s, "time_per_selected_pair", ns, "ns"))
                records.append(record(f"{NAME}/sparse", s, f"per_pair_vs_{ref_name}", ratio, "x"))
                records.append(record(f"{NAME}/sparse", s, "tflops_selected", tflops, "TFLOP/s"))
                rows.append([case, label, sett, f"{ms:.3f}", f"{kern_ms:.3f}" if kern_ms else "-", f"{ns:.5f}",
                             f"{ratio:.2f}", comp, f"{tflops:.0f}"])
                if pattern == "nosa" and not kw:
                    attn_ms[case] = ms
            except Exception as e:  # noqa: BLE001
                rows.append([case, label, sett, f"FAILED: {type(e).__name__}: {e}"[:200], "-", "-", "-", "-", "-"])
                traceback.print_exc()
    run_selection(records, rows, q_full, cases, attn_ms, iters)
    return rows


# ------------------------------------------------------------------ the selection path

SELECT_CHUNKS = (256, 2048, 4096, None)  # queries per selection call (None: the whole case at once)


def _chunked(fn, q, q_pos, chunk: int):
    """fn(q_i [1, c, Hq, D], pos_i [1, c]) -> ids [1, Hk, c, K] over chunks of `chunk` queries."""
    B, Tc = q_pos.shape
    n = Tc // chunk
    qc = jnp.moveaxis(q.reshape(B, n, chunk, HQ, D), 1, 0)
    pc = jnp.moveaxis(q_pos.reshape(B, n, chunk), 1, 0)
    ids = jax.lax.map(lambda a: fn(*a), (qc, pc))  # [n, B, Hk, chunk, K]
    return jnp.moveaxis(ids, 0, 2).reshape(B, HK, Tc, -1)


def run_selection(records: list, rows: list, q_full, cases, attn_ms: dict, iters: int) -> None:
    """The prefill selection path (stage-1 scores, pooling, two-stage top-k, mode nosa) of each case:
    the Pallas path (pallas_kernels.selection_prefill) and the jnp reference (nosa.select_blocks, as
    the model ran it before: 256 queries per call), against the sparse attention time of the same
    case (issue 4: selection <= half the attention). Also the share of (kv head, token) rows whose
    ids differ between the two (near ties in float32; expected ~0)."""
    from nosa_jax import nosa
    from nosa_jax.config import NosaConfig
    from pallas_kernels.selection_prefill import prefill_select

    cfg = NosaConfig()
    C = (T_POOL - cfg.kernel_size) // cfg.kernel_stride + 1
    k1, k2 = jax.random.split(jax.random.key(1))
    kt_pool = jax.random.normal(k1, (L, 1, C, HK, D), jnp.bfloat16) * 2
    cw_pool = jax.random.normal(k2, (L, 1, C, HK), jnp.float32)
    layer = jnp.int32(LAYER)
    n_blocks = T_POOL // BS
    for case, start, Tc in cases:
        q = q_full[:, start:start + Tc]
        q_pos = jnp.arange(start, start + Tc, dtype=jnp.int32)[None]
        kv_len = jnp.asarray([start + Tc], jnp.int32)

        def pallas(q_i, p_i):
            return prefill_select(q_i, p_i, kt_pool, cw_pool, kv_len, layer, nosa_cfg=cfg, n_blocks=n_blocks,
                                  mode="nosa")

        def reference(q_i, p_i):
            return nosa.select_blocks(q_i, p_i, kt_pool[LAYER], cw_pool[LAYER], kv_len, n_blocks, cfg, "nosa")

        chunks = sorted({c or Tc for c in SELECT_CHUNKS if (c or Tc) <= Tc})
        runs = [("reference", reference, 256)] + [("pallas", pallas, c) for c in chunks]
        ids = {}
        for impl, f, chunk in runs:
            label = f"select {impl}"
            sett = f"chunk={chunk}"
            try:
                fn = functools.partial(_chunked, f, chunk=chunk)
                ids[impl] = np.asarray(jax.jit(fn)(q, q_pos))
                ms, _, how = device_time(fn, (q, q_pos), iters)
                att = attn_ms.get(case)
                share = ms / att if att else float("nan")
                s = dict(case=case, chunk=chunk, start=start, context=CONTEXT, impl=impl, mode="nosa", timing=how,
                         hq=HQ, hk=HK, head_dim=D, block_size=BS, topk=K)
                records.append(record(f"{NAME}/select", s, "time", ms, "ms"))
                records.append(record(f"{NAME}/select", s, "time_vs_sparse_attention", share, "x"))
                rows.append([case, label, sett, f"{ms:.3f}", "-", "-", f"sel/attn {share:.2f}", "-", "-"])
            except Exception as e:  # noqa: BLE001
                rows.append([case, label, sett, f"FAILED: {type(e).__name__}: {e}"[:200], "-", "-", "-", "-", "-"])
                traceback.print_exc()
        if "reference" in ids and "pallas" in ids:
            differ = float(np.mean(np.any(ids["reference"] != ids["pallas"], axis=-1)))
            records.append(record(f"{NAME}/select", dict(case=case, mode="nosa"), "rows_differing", differ, "fraction"))
            rows.append([case, "select pallas vs reference", "ids", f"rows differing {differ:.2e}", "-", "-", "-",
                         "-", "-"])


if __name__ == "__main__":
    standalone(run, HEADER, NAME, sweep_help="also time tile_q / num_warps / num_stages variants")
