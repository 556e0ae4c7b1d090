"""Decode throughput of the jitted device loop (`decode_loop`) vs a Python loop of jitted single steps.

Random-weight 1B-shaped model (28 layers, hidden 1536, 12 q / 2 kv heads, head_dim 128), bf16,
16K tokens already in the cache (filled with random keys/values/scores: decode cost does not
depend on their values), batch 1 and 16, all three attention modes. Both loops run the same
decode step on the same state; tokens/s = batch * steps / median wall time.

    python bench/generate.py [--context 16384] [--batches 1 16] [--steps 64] [--modes nosa infllmv2 full]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from bench.common import markdown_table, record, save
from nosa_jax.config import ModelConfig
from nosa_jax.generate import PAD, DecodeState, Sampler, decode_loop, decode_step
from nosa_jax.model import NosaForCausalLM

ONE_B = dict(vocab_size=73448, hidden_size=1536, intermediate_size=4096, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072)


def random_cache(model, batch, context, capacity, key):
    """A cache of `capacity` tokens per sequence holding `context` random tokens (keys, values,
    scores, compressed keys ~ N(0, 0.25)): decode cost does not depend on the values. Built in one
    jitted call straight in each array's dtype (no zeroed cache first, no float32 copy), so a cache
    of most of the device memory can be made."""

    @jax.jit
    def make(key):
        cache = model.init_cache(batch, capacity)
        ks = jax.random.split(key, 5)
        fill = lambda k, a: (jax.random.normal(k, a.shape, a.dtype) * 0.5).astype(a.dtype) if a.size else a
        return dataclasses.replace(cache, k=fill(ks[0], cache.k), v=fill(ks[1], cache.v), cis=fill(ks[2], cache.cis),
                                   ktilde=fill(ks[3], cache.ktilde), cisw=fill(ks[4], cache.cisw),
                                   length=jnp.full((batch,), context, jnp.int32))

    return make(key)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["nosa", "infllmv2", "full"])
    ap.add_argument("--layers", type=int, default=ONE_B["num_hidden_layers"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer-unroll", type=int, default=1,
                    help="unroll of the scan over layers (0 = fully unrolled straight-line program)")
    ap.add_argument("--impl", choices=["auto", "reference", "pallas"], default="auto")
    args = ap.parse_args()
    cfg = ModelConfig(**{**ONE_B, "num_hidden_layers": args.layers})
    records, rows = [], []
    for mode in args.modes:
        model = NosaForCausalLM(cfg, mode=mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl=args.impl,
                                layer_unroll=args.layer_unroll or True)
        graphdef, state = nnx.split(model)
        sampler, eos = Sampler(), ()
        for B in args.batches:
            capacity = args.context + 2 * args.steps + 8
            base_cache = random_cache(model, B, args.context, capacity, jax.random.key(B))

            def fresh():
                c = jax.tree.map(jnp.copy, base_cache)
                st = DecodeState(cache=c, tokens=jnp.full((B, 4 * args.steps + 8), PAD, jnp.int32),
                                 logits=jnp.zeros((B, 0, cfg.vocab_size), jnp.float32),
                                 last=jnp.ones((B,), jnp.int32), done=jnp.zeros((B,), bool),
                                 step=jnp.zeros((), jnp.int32), key=jax.random.key(0))
                return jax.block_until_ready(st)

            def run_loop():
                st = fresh()
                import time
                t0 = time.perf_counter()
                st, lg = decode_loop(graphdef, state, st, jnp.zeros((B, cfg.vocab_size)), sampler=sampler,
                                     eos_ids=eos, n_steps=args.steps)
                jax.block_until_ready(st.tokens)
                return time.perf_counter() - t0

            def run_python():
                st = fresh()
                import time
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    st, _ = decode_step(graphdef, state, st, sampler=sampler, eos_ids=eos)
                jax.block_until_ready(st.tokens)
                return time.perf_counter() - t0

            st0 = fresh()
            hlo = decode_loop.lower(graphdef, state, st0, jnp.zeros((B, cfg.vocab_size)), sampler=sampler,
                                    eos_ids=eos, n_steps=args.steps).compile().as_text()
            kshape = ",".join(map(str, st0.cache.k.shape))
            big_copies = [l.strip()[:160] for l in hlo.splitlines() if f"[{kshape}]" in l and " copy(" in l]
            print(f"{mode} B={B}: copies of the [{kshape}] cache in the compiled loop: {len(big_copies)}", flush=True)
            for l in big_copies[:4]:
                print("   ", l)
            records.append(record("decode/cache_copies_in_hlo", {"mode": mode, "batch": B}, "count",
                                  len(big_copies), "ops"))
            del st0
            # interleave the two variants so drift of the machine affects both alike
            variants = (("jitted_device_loop", run_loop), ("python_loop_of_jitted_steps", run_python))
            for _, fn in variants:
                fn()  # compile and warm up
            times = {name: [] for name, _ in variants}
            for _ in range(args.repeats):
                for name, fn in variants:
                    times[name].append(fn())
            res = {}
            settings = {"mode": mode, "batch": B, "context": args.context, "steps": args.steps,
                        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "dtype": "bfloat16",
                        "attention_impl": model.settings.impl, "repeats": args.repeats,
                        "layer_unroll": args.layer_unroll}
            for name, _ in variants:
                ts = sorted(times[name])
                t = ts[len(ts) // 2]
                res[name] = B * args.steps / t
                records.append(record(f"decode/{name}", settings, "throughput", res[name], "tokens/s"))
                records.append(record(f"decode/{name}", settings, "step_time", t / args.steps * 1e3, "ms"))
                records.append(record(f"decode/{name}", settings, "spread_max_over_min", ts[-1] / ts[0], "x"))
            ratio = res["jitted_device_loop"] / res["python_loop_of_jitted_steps"]
            records.append(record("decode/loop_speedup", settings, "ratio", ratio, "x"))
            spread = max(max(v) / min(v) for v in times.values())
            rows.append([mode, B, args.context, f"{res['jitted_device_loop']:.1f}",
                         f"{res['python_loop_of_jitted_steps']:.1f}", f"{ratio:.3f}", f"{spread:.3f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["mode", "batch", "context", "device loop tok/s", "python loop tok/s", "ratio",
                            "max/min time over repeats"], rows)
    print(table)
    print("wrote", save(records, "generate", table))


if __name__ == "__main__":
    main()
