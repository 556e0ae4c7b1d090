"""The offloaded step's slot assignment alone: `pallas_kernels.slots.update_slots` (the kernel the
row length picks) against `nosa_jax.offload.assign_slots` (XLA) with the stacked-table update the
decode step does around it, on random pool states with few misses (steady state).

    python bench/probe_slots.py [--batch 27] [--slots 128 1024] [--misses 4] [--iters 200]
                                [--rank-max-slots 256 128]

`--rank-max-slots`: the kernel once per value of `slots.RANK_MAX_SLOTS` (rows of more padded slots
take the tiled long-row path), to find where the [S, S] victim rank stops paying (session 10 ran it
as --max-lanes, when one constant set both limits).

Prints a table (median us per layer call over 5 timed loops of `iters` calls after a warm-up) and
writes JSON records to bench/results/ (and $OUT).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import markdown_table, record, save
from nosa_jax.offload import assign_slots
from pallas_kernels import slots as slots_kernel
from pallas_kernels.slots import update_slots


def state(rng, L, B, Hk, S, K, misses):
    """Full pools of distinct blocks (the same in every layer) and a selection of K - misses of
    them; each call adds `misses` blocks never seen before (ids above 4 S), so every call has
    exactly that many misses and the selected blocks, stamped last, stay resident."""
    row = np.stack([np.stack([rng.permutation(4 * S)[:S] for _ in range(Hk)]) for _ in range(B)]).astype(np.int32)
    table = np.broadcast_to(row, (L, B, Hk, S)).copy()
    ids = np.full((B, Hk, K), -1, np.int32)
    for b in range(B):
        for h in range(Hk):
            ids[b, h, misses:] = rng.choice(row[b, h], K - misses, replace=False)
    stamp = rng.integers(0, 100, table.shape).astype(np.int32)
    return table, stamp, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=27)
    ap.add_argument("--slots", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--misses", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rank-max-slots", type=int, nargs="+", default=[slots_kernel.RANK_MAX_SLOTS])
    args = ap.parse_args()
    L, Hk, K, B = 32, 2, 64, args.batch
    rng = np.random.default_rng(0)
    now = jnp.full((B,), 1000, jnp.int32)
    live = jnp.ones((B,), bool)

    prev = jnp.full((L, B, Hk, K), -1, jnp.int32)
    count = jnp.zeros((L, B, Hk), jnp.int32)

    def kernel(t, s, ids, layer):  # the statistics arrays are part of the kernel's work (not carried here)
        _, _, t, s, *_ = update_slots(t, s, prev, count, count, count, layer, ids, now, live)
        return t, s

    def xla(t, s, ids, layer):
        _, _, tl, sl = assign_slots(t[layer], s[layer], ids, now)
        return t.at[layer].set(tl), s.at[layer].set(sl)

    rows, recs = [], []
    for S in args.slots:
        table, stamp, ids = (jnp.asarray(a) for a in state(rng, L, B, Hk, S, K, args.misses))
        res = {}
        for name, fn, lanes in [(f"pallas{m}", kernel, m) for m in args.rank_max_slots] + [("xla", xla, None)]:
            if lanes is not None:
                slots_kernel.RANK_MAX_SLOTS = lanes  # read when the kernel is traced (a new jit below)
            @jax.jit
            def loop(t, s, ids, fn=fn):  # layers cycling; fresh ids in the first `misses` entries
                def body(i, c):
                    fresh = 4 * S + i * args.misses + jnp.arange(args.misses, dtype=jnp.int32)
                    return fn(c[0], c[1], ids.at[:, :, :args.misses].set(fresh), i % L)
                return lax.fori_loop(0, args.iters, body, (t, s))
            t, s = jax.block_until_ready(loop(table, stamp, ids))
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(loop(table, stamp, ids))
                times.append((time.perf_counter() - t0) / args.iters * 1e6)
            res[name] = statistics.median(times)
            recs.append(record("probe/slots", {"impl": name.rstrip("0123456789"), "slots": S, "batch": B, "kv_heads": Hk,
                                               "topk": K, "misses": args.misses, "iters": args.iters,
                                               "rank_max_slots": lanes}, "time", res[name], "us"))
        for m in args.rank_max_slots:
            path = "tiled" if slots_kernel.next_pow2(max(S, 16)) > m else "[S, S] rank"
            rows.append([S, B, args.misses, m, path, f"{res[f'pallas{m}']:.1f}", f"{res['xla']:.1f}",
                         f"{res['xla'] / res[f'pallas{m}']:.2f}x"])
    print(markdown_table(["slots", "batch", "misses", "rank max slots", "kernel path", "kernel us/call", "XLA us/call",
                          "XLA / kernel"], rows))
    save(recs, "probe-slots", "")


if __name__ == "__main__":
    main()
