"""Where a decode step's time goes: trace the jitted decode loop with the JAX profiler and sum the
device kernels by name (per step), plus the device busy time against the wall time of the loop.

    python bench/profile_decode.py [--batch 1] [--context 16384] [--steps 16] [--mode nosa]
                                   [--layer-unroll 1] [--impl auto] [--top 30]
                                   [--topk-impl xla|pallas] [--select-finish jnp|pallas]
                                   [--cache-write xla|pallas]

Prints a table; when $OUT is set, writes it there as
profile-<mode>-b<batch>-u<unroll>-<topk>-<finish>-<cache write>.md with the optimised HLO beside it
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

from bench.common import busy_time, markdown_table, trace_device_events
from bench.generate import random_cache
from bench.offload import MODELS
from nosa_jax.config import ModelConfig
from nosa_jax.generate import PAD, DecodeState, Sampler, decode_loop
from nosa_jax.model import NosaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--mode", default="nosa")
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--layer-unroll", type=int, default=1)
    ap.add_argument("--impl", choices=["auto", "reference", "pallas"], default="auto")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--topk-impl", choices=["xla", "pallas"], default=None,
                    help="decode selection's top-k (default: pallas_kernels.selection.TOPK_IMPL)")
    ap.add_argument("--select-finish", choices=["jnp", "pallas"], default=None,
                    help="finish of the decode block scores (default: pallas_kernels.selection.SCORES_FINISH)")
    ap.add_argument("--cache-write", choices=["xla", "pallas"], default=None,
                    help="decode cache write (default: pallas_kernels.cache_write.WRITE_IMPL)")
    args = ap.parse_args()
    from pallas_kernels import cache_write, selection

    selection.TOPK_IMPL = args.topk_impl or selection.TOPK_IMPL
    selection.SCORES_FINISH = args.select_finish or selection.SCORES_FINISH
    cache_write.WRITE_IMPL = args.cache_write or cache_write.WRITE_IMPL
    shape = MODELS[args.model]
    cfg = ModelConfig(**{**shape, "num_hidden_layers": args.layers or shape["num_hidden_layers"]})
    model = NosaForCausalLM(cfg, mode=args.mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl=args.impl,
                            layer_unroll=args.layer_unroll or True)
    graphdef, state = nnx.split(model)
    B, n = args.batch, args.steps
    stem = (f"{args.mode}-b{B}-u{args.layer_unroll}-{selection.TOPK_IMPL}-{selection.SCORES_FINISH}"
            f"-{cache_write.WRITE_IMPL}")
    base = random_cache(model, B, args.context, args.context + 4 * n + 8, jax.random.key(0))

    def run():
        st = DecodeState(cache=jax.tree.map(jnp.copy, base), tokens=jnp.full((B, 2 * n), PAD, jnp.int32),
                         logits=jnp.zeros((B, 0, cfg.vocab_size), jnp.float32), last=jnp.ones((B,), jnp.int32),
                         done=jnp.zeros((B,), bool), step=jnp.zeros((), jnp.int32), key=jax.random.key(0))
        st = jax.block_until_ready(st)
        t0 = time.perf_counter()
        st, _ = decode_loop(graphdef, state, st, jnp.zeros((B, cfg.vocab_size)), sampler=Sampler(), eos_ids=(),
                            n_steps=n)
        jax.block_until_ready(st.tokens)
        return time.perf_counter() - t0

    run(), run()
    if os.environ.get("OUT"):  # the optimised HLO, to map the fusion names below to their ops
        st = DecodeState(cache=base, tokens=jnp.full((B, 2 * n), PAD, jnp.int32),
                         logits=jnp.zeros((B, 0, cfg.vocab_size), jnp.float32), last=jnp.ones((B,), jnp.int32),
                         done=jnp.zeros((B,), bool), step=jnp.zeros((), jnp.int32), key=jax.random.key(0))
        hlo = decode_loop.lower(graphdef, state, st, jnp.zeros((B, cfg.vocab_size)), sampler=Sampler(), eos_ids=(),
                                n_steps=n).compile().as_text()
        with gzip.open(Path(os.environ["OUT"]) / f"hlo-{stem}.txt.gz", "wt") as f:
            f.write(hlo)
    wall, events = trace_device_events(run)
    if not events:
        print("no device events in the trace (CPU run?)")
        return
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
            f"{model.settings.impl}, layer_unroll {args.layer_unroll}, top-k {selection.TOPK_IMPL}, "
            f"scores finish {selection.SCORES_FINISH}, cache write {cache_write.WRITE_IMPL}: wall {wall / n * 1e3:.3f} ms/step, device span "
            f"{span / n / 1e3:.3f} ms/step, device busy {busy / n / 1e3:.3f} ms/step, kernel sum "
            f"{total / n / 1e3:.3f} ms/step, {len(events) / n:.0f} kernels/step\n\n")
    table = head + markdown_table(["kernel", "us/step", "calls/step", "% of kernel time"], rows)
    print(table)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"profile-{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
