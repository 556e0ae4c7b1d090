"""Decode throughput of the jitted device loop (`decode_loop`) vs a Python loop of jitted single steps.

Random-weight 1B-shaped model (28 layers, hidden 1536, 12 q / 2 kv heads, head_dim 128), bf16,
16K tokens already in the cache (filled with random keys/values/scores: decode cost does not
depend on their values), batch 1 and 16, all three attention modes. Both loops run the same
decode step on the same state; tokens/s = batch * steps / median wall time.

    python bench/generate.py [--context 16384] [--batches 1 16] [--steps 64] [--modes nosa infllmv2 full]
        [--xla-variant 'NAME:KEY=VALUE;...']

`--xla-variant`: both loops again, compiled with extra XLA options (e.g.
`nocmdbuf:xla_gpu_enable_command_buffer=`), to find what separates the two loops.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from bench.common import add_layer_unroll_arg, layer_unroll, markdown_table, record, save, xla_option_value
from nosa_jax.config import SHAPES, ModelConfig
from nosa_jax.generate import DECODE_XLA_OPTIONS, PAD, DecodeState, Sampler, decode_loop, decode_step
from nosa_jax.model import NosaForCausalLM


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


def parse_variant(spec: str) -> tuple[str, dict]:
    """NAME:KEY=VALUE;KEY=VALUE -> (NAME, {KEY: VALUE}) (';' between options: a value may be a
    comma-separated list, e.g. xla_gpu_enable_command_buffer=FUSION,CUBLAS)."""
    name, _, opts = spec.partition(":")
    options = {}
    for item in filter(None, opts.split(";")):
        k, eq, v = item.partition("=")
        if not eq:
            raise SystemExit(f"--xla-variant {spec!r}: expected NAME:KEY=VALUE;...")
        options[k] = xla_option_value(v)
    return name, options


def with_options(fn, options: dict):
    """`fn` (one of the generator's jitted functions) compiled with extra XLA options."""
    if not options:
        return fn
    static = ("graphdef", "sampler", "eos_ids") + (("n_steps",) if fn is decode_loop else ())
    return jax.jit(fn.__wrapped__, static_argnames=static, donate_argnames=("st",),
                   compiler_options={**DECODE_XLA_OPTIONS, **options})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["nosa", "infllmv2", "full"])
    ap.add_argument("--layers", type=int, default=SHAPES["1b"]["num_hidden_layers"])
    ap.add_argument("--repeats", type=int, default=5)
    add_layer_unroll_arg(ap)
    ap.add_argument("--impl", choices=["auto", "reference", "pallas"], default="auto")
    ap.add_argument("--xla-variant", action="append", default=[], metavar="NAME:KEY=VALUE;...",
                    help="also run both loops compiled with these extra XLA options")
    ap.add_argument("--tag", default="", help="suffix of the results' file names")
    args = ap.parse_args()
    option_sets = [("", {})] + [parse_variant(v) for v in args.xla_variant]
    cfg = ModelConfig(**{**SHAPES["1b"], "num_hidden_layers": args.layers})
    records, rows = [], []
    for mode in args.modes:
        model = NosaForCausalLM(cfg, mode=mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl=args.impl,
                                layer_unroll=layer_unroll(args))
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

            def timed(fn):
                st = fresh()
                t0 = time.perf_counter()
                st = fn(st)
                jax.block_until_ready(st.tokens)
                return time.perf_counter() - t0

            def device_loop(loop):
                def run(st):
                    return loop(graphdef, state, st, jnp.zeros((B, cfg.vocab_size)), sampler=sampler,
                                eos_ids=eos, n_steps=args.steps)[0]
                return run

            def python_loop(step):
                def run(st):
                    for _ in range(args.steps):
                        st, _ = step(graphdef, state, st, sampler=sampler, eos_ids=eos)
                    return st
                return run

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
            # every variant: (name, options tag, runner); interleaved so drift affects all alike
            variants, first = [], {}
            for tag, options in option_sets:
                suffix = f"[{tag}]" if tag else ""
                try:
                    loop, step = with_options(decode_loop, options), with_options(decode_step, options)
                    runs = [(f"jitted_device_loop{suffix}", tag, device_loop(loop)),
                            (f"python_loop_of_jitted_steps{suffix}", tag, python_loop(step))]
                    for name, _, fn in runs:
                        first[name] = timed(fn)  # compile and warm up
                except Exception as e:  # an option this XLA does not take: report, go on
                    print(f"variant {tag!r} {options}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                variants += runs
            times = {name: [] for name, _, _ in variants}
            for _ in range(args.repeats):
                for name, _, fn in variants:
                    times[name].append(timed(fn))
            settings = {"mode": mode, "batch": B, "context": args.context, "steps": args.steps,
                        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "dtype": "bfloat16",
                        "attention_impl": model.settings.impl, "repeats": args.repeats,
                        "layer_unroll": layer_unroll(args)}
            res = {}
            for name, tag, _ in variants:
                ts = sorted(times[name])
                t = ts[len(ts) // 2]
                res[name] = B * args.steps / t
                s_ = {**settings, "xla_options": dict(option_sets)[tag]} if tag else settings
                records.append(record(f"decode/{name}", s_, "throughput", res[name], "tokens/s"))
                records.append(record(f"decode/{name}", s_, "step_time", t / args.steps * 1e3, "ms"))
                records.append(record(f"decode/{name}", s_, "spread_max_over_min", ts[-1] / ts[0], "x"))
                records.append(record(f"decode/{name}", s_, "first_call_with_compile", first[name], "s"))
            for name, tag, _ in variants:
                if not name.startswith("jitted_device_loop"):
                    continue
                base = f"python_loop_of_jitted_steps{f'[{tag}]' if tag else ''}"
                ratio = res[name] / res[base]
                records.append(record("decode/loop_speedup", {**settings, "variant": name}, "ratio", ratio, "x"))
                spread = max(max(times[n]) / min(times[n]) for n in (name, base))
                rows.append([mode, B, args.context, name, f"{res[name]:.1f}", f"{res[base]:.1f}", f"{ratio:.3f}",
                             f"{spread:.3f}", f"{first[name]:.1f}"])
                print(rows[-1], flush=True)
    table = markdown_table(["mode", "batch", "context", "device loop variant", "device loop tok/s",
                            "python loop tok/s", "ratio", "max/min time over repeats",
                            "first call (compile) s"], rows)
    print(table)
    print("wrote", save(records, "generate" + (f"-{args.tag}" if args.tag else ""), table))


if __name__ == "__main__":
    main()
