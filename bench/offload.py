"""Host-offloaded decode on the GPU: misses, locality, load bandwidth and the step time split.

Random-weight model (default: MiniCPM4-8B shapes: 32 layers, hidden 4096, intermediate 16384,
32 q / 2 kv heads, head_dim 128, vocab 73448; bf16), prompts of real text (Python standard-library
sources, one byte per token id, a different passage per sequence), prefilled on the device and
moved to pinned host memory; then the jitted decode loop runs against the offloaded cache.

For each (mode, context, pool size): decode tokens/s (median of timed windows of `--steps` steps
after a warm-up window), misses per (layer, kv head, sequence, step), hit rate, locality gamma,
bytes loaded per step, the loads' effective host->device bandwidth (bytes / device time of the
load kernels), and the device time per step split into the host flush, append (ring, windows),
selection, slot assignment, loads, attention and the rest (weights, norms, sampling), from a
profiler trace of one window (kernels mapped to the named scopes through the compiled HLO).

    python bench/offload.py [--model 8b|1b] [--contexts 16384 32768] [--batch 16] [--pools 64 128]
                            [--modes nosa] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import (busy_time, enable_compilation_cache, hlo_op_names, kernel_choices,  # noqa: E402
                          markdown_table, record, save, split_by_scope, trace_device_events)
from nosa_jax.config import SHAPES, ModelConfig  # noqa: E402
from nosa_jax.generate import Generator, OffloadSettings, decode_loop, offload_statistics  # noqa: E402
from nosa_jax.model import NosaForCausalLM  # noqa: E402
from pallas_kernels.kv_loader import load_blocks, loader_path  # noqa: E402

# Device time by part: a kernel belongs to the first part whose marker is in its name or op_name.
# The profiler gives custom calls (the Pallas kernels, cuBLAS) no op_name, so they are matched by
# kernel name: each Pallas kernel's pallas_call name beside its scope, and "gemm" for the matrix
# products (the weights' reads: cuBLAS's nvjet_* / *gemm* / *gemv*, XLA's triton_gemm_* fusions).
# With offload.LOADS == "fused" the misses are read inside the attention kernel (scope
# "nosa_attend_fetch"): "loads" is then 0 and "attention" holds both.
SCOPES = {"flush": ("nosa_flush",), "append": ("nosa_append", "nosa_decode_cache_write", "nosa_offload_append"),
          "selection": ("nosa_select", "nosa_decode_stage1", "nosa_prefill_stage1", "nosa_two_stage_topk"),
          "slots": ("nosa_slots", "nosa_update_slots"), "loads": ("nosa_load", "nosa_kv_load"),
          "attention": ("nosa_attend", "nosa_sparse_decode", "nosa_sparse_prefill"),
          "gemm": ("nvjet", "gemm", "gemv")}
PARTS = ("flush", "append", "selection", "slots", "loads", "attention", "gemm", "rest")


def text_corpus(min_bytes: int) -> bytes:
    """Real text, deterministic: the standard library's Python sources in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for p in sorted(root.rglob("*.py")):
        try:
            b = p.read_bytes()
        except OSError:
            continue
        out.append(b)
        n += len(b)
        if n >= min_bytes:
            break
    return b"".join(out)


def prompts_from_text(batch: int, length: int, vocab: int) -> list[list[int]]:
    corpus = np.frombuffer(text_corpus(batch * length + 1), np.uint8).astype(np.int64)
    # one byte per token; spread the 256 byte values over the vocabulary (fixed map)
    table = np.random.default_rng(0).permutation(vocab)[:256]
    return [table[corpus[i * length:(i + 1) * length]].tolist() for i in range(batch)]


def empty_pool(off, slots: int):
    """The same offloaded cache with a fresh, empty device pool of `slots` slots (valid after a
    decode call, which leaves every token flushed to the host store). The old pool's arrays are
    deleted: `off` must not be used again."""
    L, B, _, Hk, D = off.pool_k.shape
    bs = off.pool_k.shape[2] // off.table.shape[-1]
    dtype, sharding = off.pool_k.dtype, off.pool_k.sharding
    for name in ("pool_k", "pool_v", "pool_bias", "table", "stamp"):  # freed first: at a "fit" pool
        getattr(off, name).delete()  # size two pools do not fit the device (8B, 64K, batch 55: 2 x 56 GiB)
    new = dict(pool_k=jnp.zeros((L, B, slots * bs, Hk, D), dtype),
               pool_v=jnp.zeros((L, B, slots * bs, Hk, D), dtype),
               pool_bias=jnp.zeros((L, B, slots * bs, Hk), jnp.float32),
               table=jnp.full((L, B, Hk, slots), -1, jnp.int32), stamp=jnp.zeros((L, B, Hk, slots), jnp.int32))
    # committed to the device like the decode loop's outputs, or its second call compiles again
    return dataclasses.replace(off, **jax.device_put(new, sharding))


@dataclasses.dataclass
class Windows:
    """What `timed_windows` measured: the state after the last window, the timed windows' wall
    times (s), the first window's compile + run time, the step at which the timed windows began,
    and the device events (name, start_us, dur_us, args) of one profiled window with the compiled
    program's op names (`bench.common.hlo_op_names`) to map them to named scopes."""

    st: object
    logits: object
    times: list
    compile_s: float
    first_step: int
    events: list
    op_names: dict
    recompiled: bool


def check_room(st, n_steps: int, what: str) -> None:
    """Raise unless the decode state has `n_steps` more steps before its sequences stop. A state
    started with max_new_tokens = N marks every sequence done after its N-th token; the decode loop
    still runs its steps then, but a stopped sequence appends nothing and loads no missed block, so
    a window past that point would not time a decode step (sessions 22-24's A/B windows mostly
    did: bench/NOTES.md session 24)."""
    room = st.tokens.shape[1] - int(st.step)
    if room < n_steps:
        raise ValueError(f"{what} decodes {n_steps} steps but the state has room for {room}: past that every "
                         f"sequence has stopped (no appends, no missed blocks loaded), so those windows would "
                         f"time no decode step; start the state with max_new_tokens >= {int(st.step) + n_steps}")


@functools.cache  # one host: measured once per process (throughput.py asks once per model)
def host_read_rates(reps: int = 5) -> dict:
    """This host's pinned host -> device read rates, GB/s: "in_place" is the misses' path (the
    zero-copy Triton loader, `load_blocks(path="pallas")`, reading 32 KiB blocks of a pinned store
    in place, as the fetching attention reads its misses) and "bulk" one contiguous jitted
    `device_put` of the same bytes (XLA's DMA copy). Hosts of one card type differ - an H100 host
    read in place at 39-41 GB/s in session 26 and another at 30 in session 27, with the offloaded
    step's attention 2.20 and 3.08 ms at the same misses - so each offloaded run records them
    ("bytes": how many were read each time).
    Medians of `reps` calls after two warm-up calls; off the GPU a small store in interpret mode (the
    plumbing, not a rate)."""
    interpret = jax.default_backend() != "gpu"
    B, Hk, M, bs, D = 16, 2, 48, 64, 128  # 48 blocks per (sequence, head): 48 MiB at 16 sequences
    if interpret:  # the same program, small: interpret mode runs the programs one by one
        B, M, bs, D = 1, 2, 8, 16
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    host_kv = jax.device_put(rng.standard_normal((1, B, Hk, 2 * M, 2, bs, D), np.float32).astype(jnp.bfloat16), pinned)
    cis = jnp.zeros((1, B, 2 * M * bs, Hk), jnp.float32)
    blocks = jnp.asarray(np.stack([[rng.choice(2 * M, M, replace=False) for _ in range(Hk)] for _ in range(B)]), jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (B, Hk, M))
    pools = (jnp.zeros((1, B, M * bs, Hk, D), jnp.bfloat16), jnp.zeros((1, B, M * bs, Hk, D), jnp.bfloat16),
             jnp.zeros((1, B, M * bs, Hk), jnp.float32))
    n_bytes = B * Hk * M * 2 * bs * D * 2
    flat = jax.device_put(np.asarray(host_kv).reshape(-1)[: n_bytes // 2], pinned)
    in_place = jax.jit(lambda h, c, p: load_blocks(h, c, *p, 0, blocks, slots, block_size=bs, path="pallas",
                                                   interpret=interpret), donate_argnums=(2,))
    bulk = jax.jit(lambda h: jax.device_put(h, jax.memory.Space.Device))

    def median_s(call):
        times = []
        for i in range(2 + reps):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    state = {"pools": pools}

    def load():
        state["pools"] = in_place(host_kv, cis, state["pools"])
        return state["pools"]

    return {"in_place": n_bytes / median_s(load) / 1e9, "bulk": n_bytes / median_s(lambda: bulk(flat)) / 1e9,
            "bytes": n_bytes}


def timed_windows(gen, st, logits, steps: int, repeats: int, profile: bool = True) -> Windows:
    """Steady-state decode timing of `gen`'s jitted decode loop from (st, logits): a compile +
    warm-up window, a second warm-up window (no compilation may be left in the timing), `repeats`
    timed windows of `steps` steps each, then (with `profile`) one window under the profiler.
    Needs `enable_compilation_cache()` for the HLO to come from a cache hit."""
    check_room(st, (2 + repeats + profile) * steps, "timed_windows")

    def window(st, logits):
        st, logits = decode_loop(gen.graphdef, gen.state, st, logits, sampler=gen.sampler, eos_ids=(),
                                 n_steps=steps)
        jax.block_until_ready(st.tokens)
        return st, logits

    t0 = time.perf_counter()
    st, logits = window(st, logits)  # compile + warm-up (an offloaded run's first step fills an empty pool)
    compile_s = time.perf_counter() - t0
    st, logits = window(st, logits)
    n_compiled = decode_loop._cache_size()
    first_step = int(st.step)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        st, logits = window(st, logits)
        times.append(time.perf_counter() - t0)
    recompiled = decode_loop._cache_size() != n_compiled
    if recompiled:
        print("WARNING: the decode loop compiled again during the timed windows", flush=True)
    events, op_names = [], {}
    if profile:
        op_names = hlo_op_names(decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=gen.sampler,
                                                  eos_ids=(), n_steps=steps).compile().as_text())
        (st, logits), events = trace_device_events(lambda: window(st, logits))
    return Windows(st, logits, times, compile_s, first_step, events, op_names, recompiled)


@dataclasses.dataclass
class ABWindows:
    """What `ab_windows` measured: the state after the last window, each variant's timed window
    wall times (s; window i of every variant ran in round i), and the step at which the timed
    windows began."""

    st: object
    logits: object
    times: list  # [variant][round]
    first_step: int


def ab_windows(gen, st, logits, steps: int, repeats: int, variants: list[dict]) -> ABWindows:
    """Decode timing of several kernel variants (bench.common.KERNEL_CHOICES overrides) in ONE
    process on one state: each variant's decode loop is compiled under its choices, every variant
    runs two warm-up windows, then `repeats` rounds each run one timed window of every variant (in
    an order that rotates from round to round), each window going on from the state the last one
    left. So every variant sees the same host, the same pool contents over time and the same drift
    (between processes the same default differed by 3.6 % on one host: session 22), and round i's
    windows can be compared pairwise. The variants must compute the same thing (they do: each
    choice is an exact alternative); the module choices are restored afterwards. A variant's "xla"
    entry (parse_kernels) holds XLA options its program is compiled with, on top of the jit's own."""
    check_room(st, len(variants) * (2 + repeats) * steps, "ab_windows")
    before = kernel_choices()
    compiled = []
    try:
        for v in variants:
            kernel_choices({**before, **v})
            compiled.append(decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=gen.sampler,
                                              eos_ids=(), n_steps=steps).compile(v.get("xla")))
    finally:
        kernel_choices(before)

    def window(exe, st, logits):
        st, logits = exe(gen.state, st, logits)
        jax.block_until_ready(st.tokens)
        return st, logits

    for exe in compiled:  # warm-up (an offloaded run's first window fills an empty pool)
        for _ in range(2):
            st, logits = window(exe, st, logits)
    first_step = int(st.step)
    times = [[] for _ in variants]
    n = len(compiled)
    for r in range(repeats):
        for i in [(r + j) % n for j in range(n)]:  # the order rotates: no variant always runs first
            t0 = time.perf_counter()
            st, logits = window(compiled[i], st, logits)
            times[i].append(time.perf_counter() - t0)
    return ABWindows(st, logits, times, first_step)


def print_profile(events, op_names: dict, steps: int, top: int = 14) -> None:
    """Where the device time of a profiled window goes: busy time and span per step, the largest
    idle gaps and what surrounds them, the `top` kernels with their ops."""
    span = max(e[1] + e[2] for e in events) - min(e[1] for e in events)
    print(f"  device busy {busy_time(events) / steps / 1e3:.2f} ms/step, span "
          f"{span / steps / 1e3:.2f} ms/step, {len(events) / steps:.0f} kernels/step", flush=True)
    ev = sorted(events, key=lambda e: e[1])
    gaps = sorted(((b[1] - (a[1] + a[2]), a[0], b[0]) for a, b in zip(ev, ev[1:])), reverse=True)
    big = [g for g in gaps if g[0] > 20]
    print(f"  idle gaps > 20 us: {len(big) / steps:.1f} per step, {sum(g[0] for g in big) / steps / 1e3:.2f} "
          f"ms/step; largest:", flush=True)
    for g in gaps[:6]:
        print(f"    {g[0]:8.1f} us after {g[1][:45]} (op {op_names.get(g[1], '?')[-60:]}) before {g[2][:45]}",
              flush=True)
    by = {}
    for e in events:
        t, c = by.get(e[0], (0.0, 0))
        by[e[0]] = (t + e[2], c + 1)
    for name, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {name[:50]:50s} {t / steps:8.1f} us/step {c / steps:6.1f} calls/step "
              f"op={op_names.get(name, '?')[-90:]}", flush=True)



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pools", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=["nosa"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--loader", choices=["auto", "pallas", "xla"], default="auto")
    args = ap.parse_args()
    cfg = ModelConfig(**SHAPES[args.model])
    print(f"device {jax.devices()[0]}  jax {jax.__version__}  loader {loader_path(args.loader)}", flush=True)
    enable_compilation_cache()  # the HLO (for the time split) is read from a second, cached compile
    records, rows = [], []
    n_windows = args.repeats + 3  # 2 warm-up, timed, profiled windows
    for mode in args.modes:
        model = NosaForCausalLM(cfg, mode=mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        for ctx in args.contexts:
            # one prefill per context; each pool size then starts from an empty pool of its own
            new = len(args.pools) * n_windows * args.steps + 1
            prompts = prompts_from_text(args.batch, ctx - new, cfg.vocab_size)
            gen = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots=args.pools[0], loader=args.loader))
            st, logits, prefill_s = gen.start(prompts, max_new_tokens=new, prefill_chunk=args.prefill_chunk)
            for pool in args.pools:
                settings = {"model": args.model, "mode": mode, "context": ctx, "batch": args.batch, "pool_slots": pool,
                            "steps_per_window": args.steps, "repeats": args.repeats, "dtype": "bfloat16",
                            "loader": loader_path(args.loader), "prompts": "stdlib source text, 1 byte/token"}
                st = dataclasses.replace(st, cache=empty_pool(st.cache, pool))

                w = timed_windows(gen, st, logits, args.steps, args.repeats)
                st, logits, events, op_names, first_step = w.st, w.logits, w.events, w.op_names, w.first_step
                times, compile_s = w.times, w.compile_s
                step_s = statistics.median(times) / args.steps
                stats = offload_statistics(np.asarray(st.stats)[first_step:int(st.step)], cfg, jnp.bfloat16, mode,
                                           args.batch)
                split = {k: v / args.steps for k, v in split_by_scope(events, SCOPES, op_names).items()}  # us/step
                device_us = sum(split.values())
                load_kernel_us = sum(e[2] for e in events if "nosa_kv_load" in e[0]) / args.steps
                bytes_step = float(np.mean(stats["bytes"][-args.steps:].sum(axis=1)))
                bw = bytes_step / (load_kernel_us * 1e-6) / 1e9 if load_kernel_us else float("nan")
                tok_s = args.batch / step_s
                res = {"throughput": (tok_s, "tokens/s"), "step_time": (step_s * 1e3, "ms"),
                       "prefill_time": (prefill_s, "s"), "compile_and_first_window": (compile_s, "s"),
                       "misses_per_layer_head_seq_step": (stats["misses_per_layer_head_seq"], "blocks"),
                       "hit_rate": (stats["hit_rate_mean"], "ratio"), "gamma": (stats["gamma_mean"], "ratio"),
                       "bytes_loaded_per_step": (bytes_step, "bytes"),
                       "load_bandwidth_h2d": (bw, "GB/s"), "load_kernel_time_per_step": (load_kernel_us, "us"),
                       "device_time_per_step": (device_us, "us")}
                res |= {f"device_time_{k}": (v, "us") for k, v in split.items()}
                for metric, (val, unit) in res.items():
                    records.append(record("offload/decode", settings, metric, val, unit))
                rows.append([mode, ctx, args.batch, pool, f"{tok_s:.0f}", f"{step_s * 1e3:.2f}",
                             f"{stats['misses_per_layer_head_seq']:.2f}", f"{stats['gamma_mean']:.3f}",
                             f"{bytes_step / 2**20:.1f}", f"{bw:.1f}"] + [f"{split[k] / 1e3:.2f}" for k in PARTS])
                print(rows[-1], flush=True)
                if events and pool == args.pools[0]:  # where the device time goes, kernel by kernel
                    print_profile(events, op_names, args.steps)
    header = ["mode", "context", "batch", "pool", "tok/s", "ms/step", "misses/(layer,head,seq)", "gamma",
              "MiB loaded/step", "load GB/s"] + [f"{k} ms" for k in PARTS]
    table = markdown_table(header, rows)
    print(table)
    print("wrote", save(records, f"offload-{args.model}", table))


if __name__ == "__main__":
    main()
