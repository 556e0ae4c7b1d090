"""How XLA on the GPU compiles and times a decode-shaped projection x [M, H] @ W [H, N] (bf16) for
small M: at M = 1 the 1B decode step showed the MLP dots rewritten as multiply + reduce fusions
(the [1, I, H] product materialised) at ~0.6 TB/s. Prints, per M, the fusion kinds in the compiled
HLO and the device time per call.

    python bench/probe_gemv.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp


def main():
    H, N = 1536, 4096
    w = jax.random.normal(jax.random.key(0), (H, N), jnp.bfloat16)
    for M in (1, 2, 4, 8, 16):
        x = jax.random.normal(jax.random.key(1), (M, H), jnp.bfloat16)
        for name, f in (("dot", lambda x, w: x @ w),
                        ("dot_f32acc", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))):
            jf = jax.jit(lambda x, w, f=f: jax.lax.fori_loop(0, 100, lambda i, a: a + f(x, w)[:, :1].sum(), 0.0))
            hlo = jax.jit(f).lower(x, w).compile().as_text()
            kinds = sorted({t for t in ("reduce", "gemm", "triton", "cublas", "__cublas") if t in hlo})
            jf(x, w).block_until_ready()
            t0 = time.perf_counter()
            jf(x, w).block_until_ready()
            us = (time.perf_counter() - t0) / 100 * 1e6
            print(f"M={M:2d} {name:10s} {us:7.1f} us/call ({H * N * 2 / us / 1e6:.2f} TB/s)  hlo has: {kinds}", flush=True)


if __name__ == "__main__":
    main()
