"""Where a decode step's time goes: trace the jitted decode loop with the JAX profiler and sum the
device kernels by name (per step), plus the device busy time against the wall time of the loop.

    python bench/profile_decode.py [--batch 1] [--context 16384] [--steps 16] [--mode nosa]
                                   [--layer-unroll 0] [--impl auto] [--top 30]
                                   [--variant default --variant write=pallas,finish=pallas ...]
                                   [--xla-variant 'NAME:KEY=VALUE;...' ...]

Each --variant (kernel choices: topk xla|pallas, search early|full (the Pallas top-k's radix search),
finish jnp|pallas, write xla|pallas; "default" =
the modules' defaults) is profiled in the same process on the same model and cache, then a summary
table compares them; each --xla-variant runs the default kernels with extra XLA options on the decode
loop (e.g. 'cmdbuf-while:xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,WHILE').

Prints a table; when $OUT is set, writes it there as
profile-<mode>-b<batch>-u<unroll>-<topk>-<search>-<finish>-<cache write>.md with the optimised HLO beside it
(hlo-<the same>.txt.gz).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from bench.common import (KERNEL_CHOICES_HELP, add_layer_unroll_arg, busy_time, kernel_choices, layer_unroll,
                          markdown_table, parse_kernels, trace_device_events)
from bench.generate import parse_variant as parse_xla_variant
from bench.generate import random_cache, with_options
from nosa_jax.config import SHAPES, ModelConfig
from nosa_jax.generate import PAD, DecodeState, Sampler, decode_loop
from nosa_jax.model import NosaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--mode", default="nosa")
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None)
    add_layer_unroll_arg(ap)
    ap.add_argument("--impl", choices=["auto", "reference", "pallas"], default="auto")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--variant", action="append", default=None,
                    help="kernel choices to profile, one process for all: 'default' or e.g. "
                         f"'write=pallas,finish=pallas' ({KERNEL_CHOICES_HELP}); "
                         "repeat for several (default: one run with the modules' defaults)")
    ap.add_argument("--xla-variant", action="append", default=[], metavar="NAME:KEY=VALUE;...",
                    help="also profile the default kernels with these extra XLA options on the decode loop")
    args = ap.parse_args()
    variants = [(parse_kernels(v), "", {}) for v in (args.variant or ["default"])]
    variants += [({}, *parse_xla_variant(v)) for v in args.xla_variant]
    defaults = kernel_choices()
    shape = SHAPES[args.model]
    cfg = ModelConfig(**{**shape, "num_hidden_layers": args.layers or shape["num_hidden_layers"]})
    model = NosaForCausalLM(cfg, mode=args.mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl=args.impl,
                            layer_unroll=layer_unroll(args))
    graphdef, state = nnx.split(model)
    B, n = args.batch, args.steps
    base = random_cache(model, B, args.context, args.context + 4 * n + 8, jax.random.key(0))
    summary = []
    for variant, xla_name, xla_options in variants:
        choice = kernel_choices({**defaults, **variant})  # drops the cached traces when a choice changes
        try:
            summary.append(profile(graphdef, state, cfg, base, args, choice, model.settings.impl,
                                   with_options(decode_loop, xla_options), xla_name))
        except Exception as e:  # noqa: BLE001 - an option this XLA does not take: report, go on
            print(f"variant {xla_name or choice} {xla_options}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(markdown_table(["top-k", "search", "scores finish", "cache write", "XLA options", "wall ms/step (untraced)",
                          "device busy ms/step", "device span ms/step", "kernels/step"], summary))


def profile(graphdef, state, cfg, base, args, choice, impl, loop=decode_loop, xla_name: str = "") -> list:
    B, n = args.batch, args.steps
    stem = (f"{args.mode}-b{B}-u{layer_unroll(args)}-{choice['topk']}-{choice['search']}-{choice['finish']}-"
            f"{choice['write']}")
    stem += f"-{xla_name}" if xla_name else ""

    def fresh_state(cache):
        return DecodeState(cache=cache, tokens=jnp.full((B, 2 * n), PAD, jnp.int32),
                           logits=jnp.zeros((B, 0, cfg.vocab_size), jnp.float32), last=jnp.ones((B,), jnp.int32),
                           done=jnp.zeros((B,), bool), step=jnp.zeros((), jnp.int32), key=jax.random.key(0))

    def copied():  # the loop donates its cache: each run gets a copy of the base (made outside the trace)
        return jax.block_until_ready(fresh_state(jax.tree.map(jnp.copy, base)))

    def run(st):
        t0 = time.perf_counter()
        st, _ = loop(graphdef, state, st, jnp.zeros((B, cfg.vocab_size)), sampler=Sampler(), eos_ids=(),
                     n_steps=n)
        jax.block_until_ready(st.tokens)
        return time.perf_counter() - t0

    run(copied()), run(copied())
    untraced = sorted(run(copied()) for _ in range(5))[2]  # median wall of 5 loops outside the profiler
    if os.environ.get("OUT"):  # the optimised HLO, to map the fusion names below to their ops
        hlo = loop.lower(graphdef, state, fresh_state(base), jnp.zeros((B, cfg.vocab_size)),
                         sampler=Sampler(), eos_ids=(), n_steps=n).compile().as_text()
        with gzip.open(Path(os.environ["OUT"]) / f"hlo-{stem}.txt.gz", "wt") as f:
            f.write(hlo)
    st = copied()
    wall, events = trace_device_events(lambda: run(st))
    if not events:
        print("no device events in the trace (CPU run?)")
        return [choice["topk"], choice["search"], choice["finish"], choice["write"], xla_name or "-",
                f"{untraced / n * 1e3:.3f}",
                "-", "-", "-"]
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, _, d, _ in events:
        by_name[name][0] += d
        by_name[name][1] += 1
    total = sum(v[0] for v in by_name.values())
    busy = busy_time(events)
    span = max(e[1] + e[2] for e in events) - min(e[1] for e in events)
    rows = [[name[:90], f"{t / n:.1f}", f"{c / n:.1f}", f"{100 * t / total:.1f}"]
            for name, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]]
    head = (f"mode {args.mode}, batch {B}, context {args.context}, {cfg.num_hidden_layers} layers, impl "
            f"{impl}, layer_unroll {layer_unroll(args)}, top-k {choice['topk']} ({choice['search']} search), "
            f"scores finish {choice['finish']}, "
            f"cache write {choice['write']}{', XLA options ' + xla_name if xla_name else ''}: wall "
            f"{untraced / n * 1e3:.3f} ms/step ({wall / n * 1e3:.3f} traced), device span "
            f"{span / n / 1e3:.3f} ms/step, device busy {busy / n / 1e3:.3f} ms/step, kernel sum "
            f"{total / n / 1e3:.3f} ms/step, {len(events) / n:.0f} kernels/step\n\n")
    table = head + markdown_table(["kernel", "us/step", "calls/step", "% of kernel time"], rows)
    print(table)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"profile-{stem}.md").write_text(table)
    return [choice["topk"], choice["search"], choice["finish"], choice["write"], xla_name or "-",
            f"{untraced / n * 1e3:.3f}",
            f"{busy / n / 1e3:.3f}", f"{span / n / 1e3:.3f}", f"{len(events) / n:.0f}"]


if __name__ == "__main__":
    main()
