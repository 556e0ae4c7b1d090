"""Decode selection: the Pallas kernel path (pallas_kernels/selection.py) against the jnp reference.

Batch 16, 32 query / 2 kv heads, head_dim 128, contexts 32K and 128K (C = 2047 / 8191 valid
windows of a compressed-key pool stacked over 2 layers; layer 1 is read). The pool and the query
are in the ktilde dtype of the row: bfloat16 (the model's case since ktilde is stored in the model
dtype: one native bf16 dot pass) and float32 (the float32-accurate 3-pass TF32 dot, for
comparison with the earlier numbers). Timed:
  decode_block_scores  (kernel + jnp finish)   vs  nosa.stage1_scores + nosa.pool_blocks
  decode_select (nosa) (kernel + two-stage top-k) vs nosa.select_blocks; the default top-k is
                       the fused Pallas kernel (pallas_kernels/topk.py); also with topk_impl="xla"
                       and with each scores finish (SELECT_VARIANTS)
  two-stage top-k alone on decode rows (B=16 x Hk=2 rows of 512 / 2048 blocks, mode nosa):
    pallas_kernels.topk.two_stage_select_pallas vs nosa.two_stage_select (XLA: three sorts)
Each timing runs `iters` calls inside one jitted fori_loop (the query is perturbed per iteration so
nothing is hoisted) and reports the median over repeats of wall time / iters, after a warm-up call;
the default kernel path also gets a row of device time (CUPTI: the sum of the loop's kernel times /
iters, the measure bench/kernels_decode.py uses, so the two compare; it includes the loop's own
perturbation and sum kernels, so it is an upper bound).
Effective bandwidth = compressed-key bytes of the valid windows (B * Hk * n_win * D * itemsize:
2 bytes for bfloat16, 4 for float32) / time.

Measured (H200, float32 ktilde, 2026-11-28): block scores 87.7 us at 128K (1.53 TB/s), 32.3 us at
32K. bfloat16 ktilde: still to be measured (`python3 bench/kernels.py --only selection`);
predicted 35-45 us at 128K (67 MB instead of 134 MB per layer, one MMA pass instead of three).

    python bench/kernels_selection.py [--quick] [--sweep]
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import record, standalone
from bench.kernels_decode import device_time
from nosa_jax import nosa
from nosa_jax.config import NosaConfig
from pallas_kernels import selection as sel
from pallas_kernels.topk import two_stage_select_pallas

B, HQ, HK, D, L, LAYER = 16, 32, 2, 128, 2, 1
CONTEXTS = (32768, 131072)
NAME = "kernels_selection"
# ktilde dtypes timed: the model's (bfloat16) first, then float32 for comparison.
KT_DTYPES = ("bfloat16", "float32")
# (label, kernel keyword arguments) per ktilde dtype; "default" (no arguments) is always timed.
DEFAULT_KW: dict = {}
SWEEP_BF16 = [
    ("c64-w4-s3-noprefetch", dict(block_c=64, num_warps=4, num_stages=3, prefetch=False)),
    ("c64-w4-s4-noprefetch", dict(block_c=64, num_warps=4, num_stages=4, prefetch=False)),
    ("c128-w4-s3-prefetch", dict(block_c=128, num_warps=4, num_stages=3, prefetch=True)),
    ("c128-w8-s3-noprefetch", dict(block_c=128, num_warps=8, num_stages=3, prefetch=False)),
    ("c32-w4-s3-prefetch", dict(block_c=32, num_warps=4, num_stages=3, prefetch=True)),
    ("c64-w4-s3-prefetch-pallasfinish", dict(block_c=64, num_warps=4, num_stages=3, prefetch=True, finish="pallas")),
]
SWEEP_F32 = [
    ("c64-w4-s3-tf32x3-prefetch", dict(block_c=64, num_warps=4, num_stages=3, precision="tf32x3", prefetch=True)),
    ("c64-w4-s3-bf16x6", dict(block_c=64, num_warps=4, num_stages=3, precision="bf16x6")),
    ("c64-w4-s3-bf16x6-prefetch", dict(block_c=64, num_warps=4, num_stages=3, precision="bf16x6", prefetch=True)),
    ("c64-w4-s3-split3-prefetch", dict(block_c=64, num_warps=4, num_stages=3, precision="split3", prefetch=True)),
    ("c32-w4-s3-tf32x3-prefetch", dict(block_c=32, num_warps=4, num_stages=3, precision="tf32x3", prefetch=True)),
    ("c64-w4-s3-tf32x3-prefetch-pallasfinish",
     dict(block_c=64, num_warps=4, num_stages=3, precision="tf32x3", prefetch=True, finish="pallas")),
    # NOT selection-exact (one TF32 pass, ~1e-3 relative): what the kernel costs when the dot is cheap.
    ("c64-w4-s3-tf32-INEXACT", dict(block_c=64, num_warps=4, num_stages=3, precision="tf32")),
]
# Two-stage top-k alone: rows of n blocks as decode sees them (257 / 513 / 2049 at 16K / 32K / 128K
# context: the blocks plus the one the compression window reaches past the end) and the Pallas
# kernel's variants (label, two_stage_select_pallas keyword arguments); the first is the default.
# 1 and 2 warps: the radix rounds reduce within a warp (no shared-memory round trip) - at 16K the
# default's 16 rounds on 4 warps cost 20 us per layer in the 8B decode step (bench/NOTES.md).
TOPK_BLOCKS = (257, 513, 2049)
# decode_select rows beside the default path: XLA's top-k, and each scores finish (selection.SCORES_FINISH);
# the one that is the current default is skipped.
SELECT_VARIANTS = [("xla-topk", dict(topk_impl="xla")), ("finish=jnp", dict(finish="jnp")),
                   ("finish=pallas", dict(finish="pallas"))]
TOPK_VARIANTS = [("default", {}), ("full-search", dict(search="full")), ("w4-r4", dict(num_warps=4, radix_bits=4)),
                 ("w8-r4", dict(num_warps=8, radix_bits=4)), ("w4-r2", dict(num_warps=4, radix_bits=2)),
                 ("w1-r2", dict(num_warps=1, radix_bits=2)), ("w2-r2", dict(num_warps=2, radix_bits=2))]
TOPK_SWEEP = [("w8-r2", dict(num_warps=8, radix_bits=2)), ("w16-r4", dict(num_warps=16, radix_bits=4)),
              ("w4-r1", dict(num_warps=4, radix_bits=1))]  # (r8 = a [256, n] tensor: too big for n = 2048)


def _inputs(context: int, key, dtype="bfloat16"):
    cfg = NosaConfig()
    C = context // cfg.kernel_stride + 2  # allocated windows (cache.allocation adds slack)
    n_blocks = -(-(context + cfg.kernel_size) // cfg.block_size)
    kv_len = jnp.full((B,), context, jnp.int32)
    n_win = nosa.num_windows(kv_len, cfg)
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, HQ, D), jnp.float32).astype(dtype)  # the model's q has its dtype
    # Window means of unit-variance keys have small norms; scale so the softmax is not flat.
    ktilde = (jax.random.normal(k2, (L, B, C, HK, D), jnp.float32) * 0.5).astype(dtype)
    cisw = jax.random.normal(k3, (L, B, C, HK), jnp.float32)
    return cfg, n_blocks, q, ktilde, cisw, kv_len, n_win


def _score_sum(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.sum(x).astype(jnp.float32)
    return jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0))


def _loop(fn, iters: int):
    """One jitted program making `iters` calls of fn(q, *rest) in a loop."""

    @jax.jit
    def loop(q, *rest):
        def body(i, acc):
            # depends on i, so nothing is hoisted (in bf16 the perturbation may round away: harmless)
            qi = (q.astype(jnp.float32) * (1.0 + i.astype(jnp.float32) * 1e-7)).astype(q.dtype)
            return acc + _score_sum(fn(qi, *rest))

        return lax.fori_loop(0, iters, body, jnp.float32(0))

    return loop


def _time_loop(fn, q, rest, iters: int, repeats: int) -> float:
    """Wall seconds per call of fn(q, *rest), `iters` calls inside one jitted loop."""
    loop = _loop(fn, iters)
    jax.block_until_ready(loop(q, *rest))  # compile + warm-up
    jax.block_until_ready(loop(q, *rest))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(q, *rest))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / iters


def _device_loop(fn, q, rest, iters: int, repeats: int) -> float | None:
    """Device seconds per call of the same loop as `_time_loop`, timed as bench/kernels_decode.py
    times the decode attention (`device_time`: the sum of the GPU kernels' times, CUPTI, no launch
    gaps). Includes the loop's own per-iteration kernels (the query's perturbation and the score
    sum: a few us), so it is an upper bound. None where CUPTI is unavailable."""
    secs, _, how = device_time(_loop(fn, iters), (q, *rest), iters, repeats)
    return secs if how == "cupti" else None


def _fns(cfg, n_blocks, kw):
    def scores_kernel(q, kt, cw, n_win, kv_len):
        return sel.decode_block_scores(q, kt, n_win, kv_len - 1, LAYER, nosa_cfg=cfg, n_blocks=n_blocks, **kw)

    def scores_ref(q, kt, cw, n_win, kv_len):
        return sel.decode_block_scores_reference(q, kt, n_win, kv_len - 1, LAYER, nosa_cfg=cfg,
                                                 n_blocks=n_blocks)

    def select_kernel(q, kt, cw, n_win, kv_len):
        return sel.decode_select(q, kt, cw, n_win, kv_len, LAYER, nosa_cfg=cfg, n_blocks=n_blocks,
                                 mode="nosa", **kw)

    def select_ref(q, kt, cw, n_win, kv_len):
        return sel.decode_select_reference(q, kt, cw, n_win, kv_len, LAYER, nosa_cfg=cfg,
                                           n_blocks=n_blocks, mode="nosa")

    return scores_kernel, scores_ref, select_kernel, select_ref


def _topk_inputs(n: int, key):
    """Decode rows [B, HK, n] as the selection makes them: random pooled scores with the sink block
    and the 17 local blocks (up to the query's own, the last one) forced to +inf; qb = n - 1."""
    cfg = NosaConfig()
    k1, k2 = jax.random.split(key)
    j = jnp.arange(n)
    qb = jnp.full((B, 1, 1), n - 1, jnp.int32)
    forced = nosa.forced(j, qb, cfg)
    b_qk = jnp.where(forced, jnp.inf, jax.random.normal(k1, (B, HK, n), jnp.float32))
    b_cis = jnp.where(forced, jnp.inf, jax.random.normal(k2, (B, HK, n), jnp.float32))
    return cfg, b_qk, b_cis, qb


def run_topk(records: list, rows: list, iters: int, repeats: int, sweep: bool = False) -> None:
    """Time the two-stage top-k alone (mode nosa): XLA nosa.two_stage_select vs the Pallas kernel."""
    for n in TOPK_BLOCKS:
        context = (n - 1) * NosaConfig().block_size  # rows hold one block past the context
        settings = dict(context=context, batch=B, hk=HK, n_blocks=n, rows=B * HK, mode="nosa")
        op = f"two-stage top-k (n={n})"
        try:
            cfg, b_qk, b_cis, qb = _topk_inputs(n, jax.random.key(n))
            xla = lambda s, c, qb: nosa.two_stage_select(s, c, qb, cfg, "nosa")  # noqa: E731
            ids_x = np.asarray(jax.jit(xla)(b_qk, b_cis, qb))
            pallas = lambda s, c, qb: two_stage_select_pallas(s, c, qb, cfg, "nosa")  # noqa: E731
            ids_p = np.asarray(jax.jit(pallas)(b_qk, b_cis, qb))
            same = float(np.mean(np.all(ids_x == ids_p, axis=-1)))
            records.append(record(f"{NAME}/topk/check", settings, "identical_rows_vs_xla", same, "1"))
            rows.append([context, "-", op, "check pallas vs xla", f"identical id rows={same:.3f}", "-", "-"])
            t_x = _time_loop(xla, b_qk, (b_cis, qb), iters, repeats)
            records.append(record(f"{NAME}/topk/xla", settings, "time", t_x * 1e6, "us"))
            rows.append([context, "-", op, "xla (nosa.two_stage_select)", f"{t_x * 1e6:.1f}", "-", "1.00"])
        except Exception as e:  # noqa: BLE001
            rows.append([context, "-", op, "xla / check", f"FAILED: {type(e).__name__}: {e}"[:160], "-", "-"])
            traceback.print_exc()
            continue
        for label, kw in TOPK_VARIANTS + (TOPK_SWEEP if sweep else []):
            try:
                fn = lambda s, c, qb, kw=kw: two_stage_select_pallas(s, c, qb, cfg, "nosa", **kw)  # noqa: E731
                same_v = float(np.mean(np.all(np.asarray(jax.jit(fn)(b_qk, b_cis, qb)) == ids_x, axis=-1)))
                t = _time_loop(fn, b_qk, (b_cis, qb), iters, repeats)
                s = dict(settings, variant=label, **kw)
                records.append(record(f"{NAME}/topk/pallas", s, "time", t * 1e6, "us"))
                records.append(record(f"{NAME}/topk/check_variant", s, "identical_rows_vs_xla", same_v, "1"))
                rows.append([context, "-", op, f"pallas {label} (rows = xla: {same_v:.3f})", f"{t * 1e6:.1f}", "-",
                             f"{t_x / t:.2f}"])
            except Exception as e:  # noqa: BLE001
                rows.append([context, "-", op, f"pallas {label}", f"FAILED: {type(e).__name__}: {e}"[:160], "-", "-"])
                traceback.print_exc()


def run(records: list, quick: bool = False, sweep: bool = False) -> list[list]:
    """Time kernel vs reference at 32K and 128K; append records; return table rows.

    bfloat16 ktilde (the model's case): jnp reference, a correctness check, the kernel's block
    scores and decode_select (plus the bf16 sweep with --sweep). float32 ktilde, for comparison:
    the check and one row, the kernel's block scores (plus the precision sweep with --sweep).
    """
    rows = []
    iters, repeats = (20, 3) if quick else (100, 5)
    contexts = CONTEXTS[-1:] if quick else CONTEXTS
    for context in contexts:
        for dtype in KT_DTYPES:
            main = dtype == KT_DTYPES[0]
            tag = "bf16" if dtype == "bfloat16" else "f32"
            try:
                cfg, n_blocks, q, kt, cw, kv_len, n_win = _inputs(context, jax.random.key(context), dtype)
                rest = (kt, cw, n_win, kv_len)
                n_valid = int(n_win[0])
                key_bytes = B * HK * n_valid * D * kt.dtype.itemsize
            except Exception as e:  # noqa: BLE001
                rows.append([context, tag, "inputs", "-", f"FAILED: {type(e).__name__}: {e}"[:120], "-", "-"])
                continue
            settings = dict(context=context, batch=B, hq=HQ, hk=HK, head_dim=D, windows=n_valid,
                            n_blocks=n_blocks, ktilde_dtype=dtype, ktilde_bytes=key_bytes)
            ref_times = {}
            for what, idx in ((("block_scores", 1), ("select", 3)) if main else ()):
                try:
                    fn = _fns(cfg, n_blocks, {})[idx]
                    t = _time_loop(fn, q, rest, max(iters // 5, 5), repeats)
                    ref_times[what] = t
                    records.append(record(f"{NAME}/{what}/jnp_reference", settings, "time", t * 1e6, "us"))
                    records.append(record(f"{NAME}/{what}/jnp_reference", settings, "effective_bandwidth",
                                          key_bytes / t / 1e12, "TB/s"))
                    rows.append([context, tag, what, "jnp reference", f"{t * 1e6:.1f}",
                                 f"{key_bytes / t / 1e12:.2f}", "1.00"])
                except Exception as e:  # noqa: BLE001
                    rows.append([context, tag, what, "jnp reference", f"FAILED: {type(e).__name__}: {e}"[:160], "-", "-"])
                    traceback.print_exc()
            # Correctness of the kernel path at this size (same inputs), reported, not asserted.
            try:
                sk, sr, ek, er = [jax.jit(f) for f in _fns(cfg, n_blocks, DEFAULT_KW)]
                a, r = np.asarray(sk(q, *rest)), np.asarray(sr(q, *rest))
                fin = np.isfinite(r)
                same_inf = bool(np.array_equal(np.isinf(a), np.isinf(r)) and np.array_equal(a[~fin], r[~fin]))
                err = float(np.max(np.abs(a[fin] - r[fin]))) if fin.any() else 0.0
                # Reference ids on the CPU backend: its lax.top_k breaks ties lowest-index-first (the
                # contract); XLA's GPU top-k does not always.
                cpu = jax.devices("cpu")[0]
                ids_a = np.asarray(ek(q, *rest))
                ids_r = np.asarray(er(*[jax.device_put(np.asarray(x), cpu) for x in (q, *rest)]))
                same_rows = float(np.mean(np.all(np.sort(ids_a, -1) == np.sort(ids_r, -1), axis=-1)))
                records.append(record(f"{NAME}/block_scores/check", settings, "max_abs_err_vs_reference", err, "1"))
                records.append(record(f"{NAME}/select/check", settings, "identical_rows_vs_reference", same_rows, "1"))
                rows.append([context, tag, "check", "kernel vs reference",
                             f"max|err|={err:.2e} inf-pattern={'same' if same_inf else 'DIFFERENT'}",
                             f"identical id rows={same_rows:.3f}", "-"])
            except Exception as e:  # noqa: BLE001
                rows.append([context, tag, "check", "kernel vs reference", f"FAILED: {type(e).__name__}: {e}"[:160],
                             "-", "-"])
                traceback.print_exc()
            variants = [("default", DEFAULT_KW)]
            if sweep:
                variants += SWEEP_BF16 if dtype == "bfloat16" else SWEEP_F32
            for label, kw in variants:
                for what, idx in (("block_scores", 0), ("select", 2)):
                    if what == "select" and (label != "default" or not main):
                        continue
                    try:
                        fn = _fns(cfg, n_blocks, kw)[idx]
                        t = _time_loop(fn, q, rest, iters, repeats)
                        s = dict(settings, variant=label, **{k: str(v) for k, v in kw.items()})
                        records.append(record(f"{NAME}/{what}/pallas", s, "time", t * 1e6, "us"))
                        records.append(record(f"{NAME}/{what}/pallas", s, "effective_bandwidth",
                                              key_bytes / t / 1e12, "TB/s"))
                        sp = f"{ref_times[what] / t:.2f}" if what in ref_times else "-"
                        rows.append([context, tag, what, f"pallas {label}", f"{t * 1e6:.1f}",
                                     f"{key_bytes / t / 1e12:.2f}", sp])
                        dev = _device_loop(fn, q, rest, iters, repeats) if label == "default" else None
                        if dev:  # the decode attention's measure (kernels_decode.py), for issue 4's comparison
                            records.append(record(f"{NAME}/{what}/pallas", s, "device_time", dev * 1e6, "us"))
                            records.append(record(f"{NAME}/{what}/pallas", s, "device_effective_bandwidth",
                                                  key_bytes / dev / 1e12, "TB/s"))
                            rows.append([context, tag, what, f"pallas {label}, device time (CUPTI, upper bound)",
                                         f"{dev * 1e6:.1f}", f"{key_bytes / dev / 1e12:.2f}", "-"])
                    except Exception as e:  # noqa: BLE001
                        rows.append([context, tag, what, f"pallas {label}", f"FAILED: {type(e).__name__}: {e}"[:160],
                                     "-", "-"])
                        traceback.print_exc()
            defaults = dict(topk_impl=sel.TOPK_IMPL, finish=sel.SCORES_FINISH)
            for label, extra in (SELECT_VARIANTS if main else ()):
                # decode_select with another top-k or finish than the defaults: time, device time, and
                # whether its ids equal the default path's
                if all(defaults[k] == v for k, v in extra.items()):
                    continue
                try:
                    def select_variant(q, kt, cw, n_win, kv_len, extra=extra):
                        return sel.decode_select(q, kt, cw, n_win, kv_len, LAYER, nosa_cfg=cfg, n_blocks=n_blocks,
                                                 mode="nosa", **extra)

                    ids_a = np.asarray(jax.jit(select_variant)(q, *rest))
                    same = float(np.mean(np.all(ids_a == np.asarray(jax.jit(_fns(cfg, n_blocks, {})[2])(q, *rest)),
                                                axis=-1)))
                    t = _time_loop(select_variant, q, rest, iters, repeats)
                    s = dict(settings, variant=label, **extra)
                    records.append(record(f"{NAME}/select/pallas", s, "time", t * 1e6, "us"))
                    records.append(record(f"{NAME}/select/check_variant", s, "identical_rows_vs_default", same, "1"))
                    sp = f"{ref_times['select'] / t:.2f}" if "select" in ref_times else "-"
                    rows.append([context, tag, "select", f"pallas {label} (rows = default: {same:.3f})",
                                 f"{t * 1e6:.1f}", f"{key_bytes / t / 1e12:.2f}", sp])
                    dev = _device_loop(select_variant, q, rest, iters, repeats)
                    if dev:
                        records.append(record(f"{NAME}/select/pallas", s, "device_time", dev * 1e6, "us"))
                        rows.append([context, tag, "select", f"pallas {label}, device time (CUPTI, upper bound)",
                                     f"{dev * 1e6:.1f}", f"{key_bytes / dev / 1e12:.2f}", "-"])
                except Exception as e:  # noqa: BLE001
                    rows.append([context, tag, "select", f"pallas {label}", f"FAILED: {type(e).__name__}: {e}"[:160],
                                 "-", "-"])
                    traceback.print_exc()
    run_topk(records, rows, iters, repeats, sweep)
    return rows


HEADER = ["context", "ktilde", "op", "impl", "time (us)", "eff. TB/s (ktilde bytes)", "speedup vs jnp (same dtype)"]


if __name__ == "__main__":
    standalone(run, HEADER, NAME, sweep_help="also time kernel tile/warp variants (bf16) and precision variants (float32)")
