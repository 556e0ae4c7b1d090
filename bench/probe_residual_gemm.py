"""Does the residual add that XLA folds into the decode GEMMs slow them down? In the offloaded 8B step
(session 27 profile) the two projections followed by a residual add - o_proj (4096 -> 4096) and
down (16384 -> 4096) - run as cuBLAS `..._badd_...` kernels (the add as the GEMM's beta = 1 input)
at 2.72 TB/s on an H100 and 3.67 on an H200, while gate/up (no add) reads its weights at 3.04 and
4.24. The shapes differ too (4096 outputs against 32768), so this probe separates the two causes
at decode shapes (bf16, M rows, under the generator's XLA options):

  plain      h @ W                                          the GEMM alone
  residual   x + h @ W                                      the model's form (XLA: one GEMM, beta = 1)
  barrier    x + optimization_barrier(h @ W)                the GEMM, then the add as its own kernel
  chain      x = x + h @ W_l for CHAIN distinct W_l         the model's form as its layers run it: x
                                                            carried, each layer its own weights (time
                                                            per GEMM; no weight stays in the L2)

for o_proj, down and (for comparison) gate/up and qkv, M = 1, 16 and 64. Device time per call from
CUPTI (median of 50 iterations), the kernels each ran, and the weight bytes / time. If "barrier" beats
"residual" at M = 16, the model should keep the add out of the GEMM (for example by adding in the
next norm's fusion).

Session 28 (H100): the folded add costs 1-4 % ("residual" against "plain") and "barrier" is slower,
but o_proj alone ran at 4.3 TB/s, above the H100's HBM: its 33.5 MB of weights stayed in the 50 MB
L2 across the repeats. And down alone chose a split-K kernel (2.85 TB/s), while in the model o_proj
and down both ran one non-split `..._badd_` kernel at 2.72 TB/s. "chain" (added after that run)
times the model's form without the L2 reuse and shows which kernel XLA picks for it.

    python bench/probe_residual_gemm.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from jax import lax

from bench.common import device_name, markdown_table, record, save
from nosa_jax.config import SHAPES
from nosa_jax.generate import DECODE_XLA_OPTIONS

CHAIN = 8  # the "chain" variant's layers: 8 x 33.5 MB of o_proj weights are more than an L2 holds


def _chain(x, h, ws):
    for w in ws:  # static slices of the stacked weights, as the model's unrolled layers take them
        x = x + h @ w
    return x


VARIANTS = {"plain": lambda x, h, w: h @ w,
            "residual": lambda x, h, w: x + h @ w,
            "barrier": lambda x, h, w: x + lax.optimization_barrier(h @ w),
            "chain": _chain}


def main():
    from jax.experimental.mosaic.gpu import profiler
    s = SHAPES["8b"]
    H, I, D = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q_kv = (s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * D
    shapes = {"o_proj": (H, H), "down": (I, H), "gate_up": (H, 2 * I), "qkv": (H, q_kv)}
    rows, records = [], []
    for name, (K, N) in shapes.items():
        w = jax.random.normal(jax.random.key(0), (K, N), jnp.bfloat16) * 0.02
        ws = jax.random.normal(jax.random.key(3), (CHAIN, K, N), jnp.bfloat16) * 0.02 if N == H else None
        for M in (1, 16, 64):
            h = jax.random.normal(jax.random.key(1), (M, K), jnp.bfloat16)
            x = jax.random.normal(jax.random.key(2), (M, N), jnp.bfloat16)
            ref = None
            for variant, f in VARIANTS.items():
                if variant != "plain" and N != H:  # only the projections that feed a residual add
                    continue
                fn = jax.jit(f, compiler_options=DECODE_XLA_OPTIONS)
                weights = ws if variant == "chain" else w
                out = jax.block_until_ready(fn(x, h, weights))
                err = "-"  # "plain" computes something else, "chain" CHAIN products
                if variant in ("residual", "barrier"):
                    ref = out if ref is None else ref
                    err = f"{float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)))):.1e}"
                _, per_iter = profiler.measure(fn, aggregate=False, iterations=50)(x, h, weights)
                us = statistics.median(sum(t for _, t in it) for it in per_iter) * 1e3
                us /= CHAIN if variant == "chain" else 1  # per GEMM
                kernels = sorted({k.split("(")[0][:40] for k, _ in per_iter[0]})
                rows.append([name, M, variant, f"{us:.1f}", f"{w.size * 2 / us / 1e6:.2f}", len(per_iter[0]),
                             ", ".join(kernels), err])
                records.append(record("probe_residual_gemm", {"projection": name, "K": K, "N": N, "M": M,
                                                              "variant": variant}, "time", us, "us"))
                print(rows[-1], flush=True)
    table = markdown_table(["projection", "M", "variant", "us", "weight TB/s", "kernels", "kernel names",
                            "max |diff| vs residual"], rows)
    print(f"\n{device_name()}, jax {jax.__version__}\n\n{table}")
    save(records, "probe-residual-gemm", table)


if __name__ == "__main__":
    main()
