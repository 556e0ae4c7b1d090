"""Does the offloaded decode loop update its slot pools in place? The compiled loop's memory
analysis (arguments, outputs, aliased bytes, temporaries) against the pools' bytes, and the copies
of pool-shaped arrays in its HLO.

    python bench/probe_decode_memory.py [--layers 4] [--batch 4] [--context 8192] [--pool 128]

Why: at 8B / 128K / 27 sequences with the full-card fit pool (2 x 53 GiB pools), the first decode
call asked for one more pool-sized buffer (53 GiB) and ran out of memory
(bench/results/throughput-8b-s9-fit-*). If the loop copies a pool, every call pays that copy and the
fit pool must leave room for it; if it does not, the missing room was the benchmark's own.
A 1B-shaped model (fewer layers) is enough: the aliasing does not depend on the sizes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nosa_jax.config import SHAPES, ModelConfig  # noqa: E402
from nosa_jax.generate import Generator, OffloadSettings, decode_loop  # noqa: E402
from nosa_jax.model import NosaForCausalLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--pool", type=int, default=128, help="slots per (layer, sequence, kv head)")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    cfg = ModelConfig(**dict(SHAPES["1b"], num_hidden_layers=args.layers))
    model = NosaForCausalLM(cfg, mode="nosa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.context - 64).tolist() for _ in range(args.batch)]
    gen = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots=args.pool))
    st, logits, _ = gen.start(prompts, max_new_tokens=args.steps + 1)
    c = st.cache
    pool_bytes = {n: getattr(c, n).nbytes for n in ("pool_k", "pool_v", "pool_bias", "table", "stamp")}
    compiled = decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=gen.sampler, eos_ids=(),
                                 n_steps=args.steps).compile()
    ma = compiled.memory_analysis()
    print(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}  loader {c.loader}")
    print("pool arrays (bytes):", {k: f"{v / 2**20:.1f} MiB" for k, v in pool_bytes.items()})
    for f in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_alias_size_in_bytes",
              "host_temp_size_in_bytes"):
        v = getattr(ma, f, None)
        print(f"  {f:32s} {'-' if v is None else f'{v / 2**20:12.1f} MiB'}")
    temp = getattr(ma, "temp_size_in_bytes", 0)
    print(f"temp / pool_k = {temp / pool_bytes['pool_k']:.2f}  "
          f"(>= 1: the loop holds a pool-sized temporary, i.e. a copy of a pool)")
    text = compiled.as_text()
    dims = ",".join(str(d) for d in c.pool_k.shape)
    copies = [ln.strip()[:200] for ln in text.splitlines()
              if re.search(r"=\s*\S*\[" + re.escape(dims) + r"\]\S*\s+copy(-start)?\(", ln)]
    print(f"pool-shaped copies in the compiled HLO: {len(copies)}")
    for ln in copies[:8]:
        print("   ", ln)


if __name__ == "__main__":
    main()
