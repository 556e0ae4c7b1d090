"""Would one fused gate/up parameter make the decode MLP faster? Times the MLP's first half at decode
shapes (bf16, M = batch rows, under the generator's XLA options):

  separate   act(x @ W_gate) * (x @ W_up)                 two GEMMs (the model until session 17)
  fused      h = x @ W_gate_up; act(h[:, :I]) * h[:, I:]   one GEMM over the concatenated columns

for the 8B (H 4096, I 16384) and 1B (H 1536, I 4096) shapes, M = 1, 16 and 64. Device time per call
from CUPTI (median of 50), the kernels it ran, and fused / separate. Both variants read the same bytes; a gain can only come from
one GEMM's ramp and tail instead of two, and one launch fewer per layer.

    python bench/probe_mlp.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import device_name, markdown_table, record, save
from nosa_jax.config import SHAPES
from nosa_jax.generate import DECODE_XLA_OPTIONS


def main():
    from jax.experimental.mosaic.gpu import profiler
    rows, records = [], []
    for model in ("8b", "1b"):
        H, I = SHAPES[model]["hidden_size"], SHAPES[model]["intermediate_size"]
        wg, wu = (jax.random.normal(jax.random.key(i), (H, I), jnp.bfloat16) * 0.02 for i in (0, 1))
        wgu = jnp.concatenate([wg, wu], axis=1)
        separate = jax.jit(lambda x, wg, wu: jax.nn.silu(x @ wg) * (x @ wu), compiler_options=DECODE_XLA_OPTIONS)

        def fused_fn(x, w):
            h = x @ w
            return jax.nn.silu(h[:, :I]) * h[:, I:]

        fused = jax.jit(fused_fn, compiler_options=DECODE_XLA_OPTIONS)
        for M in (1, 16, 64):
            x = jax.random.normal(jax.random.key(2), (M, H), jnp.bfloat16)
            a, b = separate(x, wg, wu), fused(x, wgu)
            err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            times = {}
            for name, fn, args in (("separate", separate, (x, wg, wu)), ("fused", fused, (x, wgu))):
                jax.block_until_ready(fn(*args))
                _, per_iter = profiler.measure(fn, aggregate=False, iterations=50)(*args)
                times[name] = statistics.median(sum(t for _, t in it) for it in per_iter) * 1e3
                kernels = sorted({n.split("(")[0][:36] for n, _ in per_iter[0]})
                nbytes = (wgu.size + x.size + a.size) * 2
                rows.append([model, M, name, f"{times[name]:.1f}", f"{nbytes / times[name] / 1e6:.2f}",
                             len(per_iter[0]), ", ".join(kernels)])
                records.append(record("probe_mlp", {"model": model, "M": M, "variant": name}, "time",
                                      times[name], "us"))
            rows.append([model, M, "fused / separate", f"{times['fused'] / times['separate']:.3f}", "", "",
                         f"max |diff| {err:.2e}"])
            print(rows[-3:], flush=True)
    table = markdown_table(["model", "M", "variant", "us", "TB/s", "kernels", "kernel names"], rows)
    print(f"\n{device_name()}, jax {jax.__version__}\n\n{table}")
    save(records, "probe-mlp", table)


if __name__ == "__main__":
    main()
