"""How XLA on the GPU compiles and times a decode-shaped projection x [M, H] @ W [H, N] (bf16) for
small M, under the generator's XLA options. (A first version sliced W out of a stacked [L, H, N]
argument outside any loop: XLA then copied the slice first - `loop_dynamic_slice_fusion` - which
the model's scan over layers does not do; the weights are now a plain argument.)

At M = 1 the 1B decode step showed the projections rewritten as multiply + reduce fusions at
~0.6 TB/s. Variants per shape: the plain dot at M = 1, 2, 4, 16, and M = 1 padded to 2 rows
(a duplicate row) so XLA keeps a GEMM. Device time per call from CUPTI; prints the kernels run.

    python bench/probe_gemv.py [KEY=VALUE ...]   # extra XLA options, e.g. xla_gpu_gemm_rewrite_size_threshold=0
    python bench/probe_gemv.py --grid            # M = 1 only, plain and padded to 2 rows, over a grid of
                                                 # (H, N): which one-row products XLA keeps as a GEMM
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import xla_option_value
from nosa_jax.generate import XLA_OPTIONS

SHAPES = {"1b_qkv": (1536, 2048), "1b_gate_up": (1536, 8192), "1b_down": (4096, 1536),
          "8b_gate_up": (4096, 32768), "8b_down": (16384, 4096)}
GRID = [(h, n) for h in (1024, 1536, 2048, 4096) for n in (1536, 2048, 3072, 4096, 6144, 8192)]


def pad_rows(x, m):
    return jnp.concatenate([x, jnp.broadcast_to(x[:1], (m - x.shape[0], x.shape[1]))], 0)


def main():
    from jax.experimental.mosaic.gpu import profiler
    extra = {}
    grid = "--grid" in sys.argv
    for kv in (a for a in sys.argv[1:] if a != "--grid"):
        k, _, v = kv.partition("=")
        extra[k] = xla_option_value(v)
    print("XLA options:", {**XLA_OPTIONS, **extra})
    shapes = {f"{h}x{n}": (h, n) for h, n in GRID} if grid else SHAPES
    cases = ((1, None), (1, 2)) if grid else ((1, None), (1, 2), (1, 8), (2, None), (4, None), (16, None))
    for name, (H, N) in shapes.items():
        w = jax.random.normal(jax.random.key(0), (H, N), jnp.bfloat16)
        nbytes = H * N * 2
        for M, pad in cases:
            x = jax.random.normal(jax.random.key(1), (M, H), jnp.bfloat16)

            def f(x, w, pad=pad):
                xx = pad_rows(x, pad) if pad else x
                return (xx @ w)[:M]

            jf = jax.jit(f, compiler_options={**XLA_OPTIONS, **extra})
            jax.block_until_ready(jf(x, w))
            _, per_iter = profiler.measure(jf, aggregate=False, iterations=20)(x, w)
            us = statistics.median(sum(t for _, t in it) for it in per_iter) * 1e3
            kernels = sorted({n.split("(")[0][:40] for n, _ in per_iter[0]})
            label = f"M={M}" + (f" padded to {pad}" if pad else "")
            print(f"{name:10s} {label:16s} {us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s  kernels: {kernels}",
                  flush=True)


if __name__ == "__main__":
    main()
