"""Steady-state decode throughput: FullAttn vs InfLLMv2 vs NOSA, on the device and offloaded (issue 6).

Methods (`--modes`):
  full              FullAttn, the whole KV cache on the device (mode "full": the Pallas decode kernel
                    over every causal block, the fastest dense path the project has)
  infllmv2, nosa    the sparse modes with the whole cache on the device
  infllmv2-offload, nosa-offload
                    the host-offloaded cache (`nosa_jax.offload`) with a device pool of `--pools`
                    times top-k slots per (layer, sequence, kv head) (default: top-k, 2x top-k and
                    "fit": at each budget's largest batch, the largest pool that keeps it)
Random-weight models (`--models`: 8b = the NOSA-8B / MiniCPM4-8B shape, 1b; bf16), contexts
(`--contexts`, tokens per sequence), batch sizes from 1 up to the largest that fits each GPU memory
budget (`--budgets-gb`, GiB, "full" = the whole device; 80 emulates the paper's 80 GB card) by
`nosa_jax.offload.capacity_plan` (weights + KV state + `--headroom-gb`; offloaded runs also within
`--host-gb` of host memory, their store placed in XLA's pinned pool less 2 GiB).

Each run: decode tokens/s over all sequences = batch / step time, the step time the median of
`--repeats` timed windows of `--steps` (>= 32) decode steps after two warm-up windows (the jitted
device loop, `bench/offload.py`'s `timed_windows`); the device time per step split into selection,
loads, attention and the rest (weights, norms, sampling, appends, slot bookkeeping, flushes) from a
profiler trace of one more window, kernels mapped to named scopes through the compiled HLO; memory
per sequence on the device and the host; locality gamma and misses (offloaded); and the roofline
floor: the bytes the step must move (weights once - the input embedding table excepted, of which
only `batch` rows are read -, the selected K/V of every layer and sequence - K blocks x 64 tokens x
2 x Hk x D x 2 bytes, the whole context for FullAttn -, the compressed keys (and, for NOSA, the
window eviction scores) read by the selection, at 4.3 TB/s; the missed blocks over PCIe at 53 GB/s,
serial as the step runs them) and measured / floor. Offloaded runs also record this host's pinned
read rates (`bench/offload.host_read_rates`: in place, as the fetching attention reads its misses,
and as one bulk copy) and the floor again with the misses at the in-place rate (`floor_time_host`):
hosts of one card type read pinned memory in place at 30-41 GB/s, which moves the step.

Caches: on-device runs decode from a cache of random keys/values/scores (their cost does not depend
on the values; no prefill); offloaded runs prefill `--distinct` passages of real text (standard
library sources, one byte per token) once per (mode, context), tile them over the batch (a sequence
is copied, not shared: the decode work is that of distinct sequences, and the misses and gamma are
those of the distinct passages) and move them to the host store.

Report: records {name, settings, metric, value, unit, device, jax_version, date} in
throughput-<model>[-<tag>]-<date>.json (bench/common.save), a Markdown file with the run table, the
"equivalent batch" table (each method at its own largest batch under one budget), the "same batch"
table, the paper's anchors and the issue's targets (met / missed with the gap and the part of the
step responsible), and PNG plots (tokens/s vs context; step split) beside them. `--report
FILE.json ...` rebuilds tables and plots from saved records (e.g. of several device calls).

    python bench/throughput.py [--quick] [--models 8b 1b] [--contexts 16384 ...] [--modes ...]
        [--batches 1 16 ...] [--budgets-gb 80 full] [--pools 1 2 fit] [--steps 32] [--repeats 5] [--tag T]
        [--resume EARLIER.json]      # keep the runs an earlier, stopped call finished
        [--kernels slots=xla,loads=separate]   # kernel choices for every run (bench/common.KERNEL_CHOICES)
        [--layer-unroll 0]           # the layers as a straight-line program instead of a scan
    python bench/throughput.py --dry-run ...     # the plan: which runs, batches, memory; no timing
    python bench/throughput.py ... --ab default finish=pallas   # kernel variants compared in one process:
                                 # alternating windows on one state, paired ratios (bench/offload.ab_windows)
    python bench/throughput.py --report bench/results/throughput-*.json [--out-dir DIR]
    nosa-jax bench [the same arguments]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the "full" budget: the whole card
# CUDA's stream-ordered allocator instead of XLA's BFC arena: after the offloaded runs' prefills the
# BFC arena was too fragmented for the pool of the largest batch (8B, 16K, 188 sequences: one
# 23.5 GiB buffer, "ran out of memory ... fragmentation"); with cuda_async the same run completed
# (bench/results/throughput-8b-s4-max-async-2026-11-28).
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import (KERNEL_CHOICES_HELP, add_layer_unroll_arg, compiled_memory_line,  # noqa: E402
                          device_memory_line, enable_compilation_cache, kernel_choices, layer_unroll,
                          markdown_table, parse_kernels, record, save, split_by_scope)
from bench.offload import (SCOPES, ab_windows, empty_pool, host_read_rates, print_profile,  # noqa: E402
                           prompts_from_text, timed_windows)
from nosa_jax.cache import DEFAULT_PREFILL_CHUNK, cache_bytes  # noqa: E402
from nosa_jax.config import SHAPES, ModelConfig, NosaConfig  # noqa: E402
from nosa_jax import offload  # noqa: E402
from nosa_jax.generate import PINNED_HOST_LIMIT_ENV, decode_loop  # noqa: E402
from nosa_jax.offload import capacity_plan, fit_pool_slots, num_selected, offload_bytes, weight_bytes  # noqa: E402

# The offloaded stores of the largest batches need more pinned host memory than the GPU client's
# default pool (64 GiB): 90 % of the RAM. Read when the GPU backend starts, which no import does.
os.environ.setdefault(PINNED_HOST_LIMIT_ENV,
                      str(int(0.9 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30)))

# "tiny" is a test hook (CPU smoke tests), not one of the table's models
MODELS = {**SHAPES,
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                       nosa=NosaConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1,
                                       local_blocks=2, topk=8, qk_select=5))}
METHODS = ("full", "infllmv2", "nosa", "infllmv2-offload", "nosa-offload")
LABELS = {"full": "FullAttn", "infllmv2": "InfLLMv2 (device)", "nosa": "NOSA (device)",
          "infllmv2-offload": "InfLLMv2 offload", "nosa-offload": "NOSA offload"}
HBM_BPS = 4.3e12  # measured device-to-device copy on the H200 (shared/notes/perf-anchors.md)
PCIE_BPS = 53e9  # measured bulk pinned host -> device on the H200
GiB = 2**30
PINNED_MARGIN = 2 * GiB  # of the pinned pool, kept free of the offloaded store for transfer buffers
DTYPE = jnp.bfloat16
# The step split of the table: the named scopes of bench/offload.SCOPES, with flush, append and slots
# counted in "rest" (with the small kernels: norms, rope, residuals, cache writes, slot update);
# "gemm" (the weights' reads) is split out so that "rest" is what the weight floor does not cover.
STEP_PARTS = ("selection", "loads", "attention", "gemm", "rest")
FULL_DEFAULTS = dict(models=["8b", "1b"], contexts=[16384, 32768, 65536, 131072], budgets_gb=["80", "full"],
                     repeats=5)
QUICK_DEFAULTS = dict(models=["8b"], contexts=[16384], budgets_gb=["80"], repeats=3)
PAPER = {"speedup_vs_full": 5.04, "nosa_16k_b16_tok_s": 2551.66, "infllmv2_16k_b16_tok_s": 1762.16,
         "nosa_over_infllmv2_16k": 2551.66 / 1762.16}
TARGETS = {"nosa_16k_b16_tok_s": 3000.0, "nosa_over_infllmv2_16k": 1.45, "speedup_vs_full": 5.0, "floor_ratio": 1.3}


def method_mode(method: str) -> tuple[str, bool]:
    """(attention mode, offloaded) of a method name."""
    return method.removesuffix("-offload"), method.endswith("-offload")


def pool_label(mult: float | None) -> str:
    return "-" if not mult else ("top-k" if mult == 1 else f"{mult:.3g}x top-k")


def method_key(m: tuple[str, str]):
    """Table order of (method, pool label): the methods' order, then the pool size."""
    method, pool = m
    mult = 0 if pool == "-" else (1 if pool == "top-k" else float(pool.split("x")[0]))
    return (METHODS.index(method) if method in METHODS else 9, mult)


def ctx_label(ctx: int) -> str:
    return f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)


# ------------------------------------------------------------------------------------------ roofline
def roofline(cfg: ModelConfig, dtype, mode: str, context: int, batch: int, pcie_bytes: float = 0.0) -> dict:
    """The bytes one decode step must move and the time they take at HBM_BPS (device memory) and
    PCIE_BPS (missed blocks, host -> device, serial with the rest as the step runs them).
    Times in seconds; `pcie_bytes` per step (all sequences)."""
    L, Hk, D, n = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.nosa
    it = jnp.dtype(dtype).itemsize
    w = weight_bytes(cfg, dtype) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * it)
    if mode == "full":
        kv = context * 2 * Hk * D * it
        ck = 0
    else:
        kv = num_selected(cfg, context) * n.block_size * 2 * Hk * D * it
        windows = max(0, (context - n.kernel_size) // n.kernel_stride + 1)
        ck = windows * Hk * D * it + (windows * Hk * 4 if mode == "nosa" else 0)  # ktilde (+ cisw, float32)
    out = {"weights_bytes": w, "kv_bytes": batch * L * kv, "compressed_bytes": batch * L * ck,
           "pcie_bytes": float(pcie_bytes)}
    out["hbm_bytes"] = out["weights_bytes"] + out["kv_bytes"] + out["compressed_bytes"]
    out |= {"weights_s": w / HBM_BPS, "kv_s": out["kv_bytes"] / HBM_BPS,
            "compressed_s": out["compressed_bytes"] / HBM_BPS, "pcie_s": out["pcie_bytes"] / PCIE_BPS}
    out["hbm_s"] = out["hbm_bytes"] / HBM_BPS
    out["floor_s"] = out["hbm_s"] + out["pcie_s"]
    out["floor_overlap_s"] = max(out["hbm_s"], out["pcie_s"])
    return out


# ---------------------------------------------------------------------------------------------- plan
def device_bytes_limit() -> int:
    d = jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    from nosa_jax.generate import host_memory_bytes
    return int(host_memory_bytes() or 0)


def budgets(spec: list[str]) -> dict[str, int]:
    """{label: bytes}: numbers are GiB; "full" is the device's allocator limit."""
    out = {}
    for s in spec:
        if s == "full":
            b = device_bytes_limit()
            out[f"full ({b / GiB:.0f} GiB)"] = b
        else:
            out[f"{float(s):g} GiB"] = int(float(s) * GiB)
    return out


def per_seq_bytes(cfg, method: str, context: int, slots: int | None) -> tuple[int, int]:
    mode, off = method_mode(method)
    if off:
        return offload_bytes(cfg, 1, context, DTYPE, mode, slots)
    return cache_bytes(cfg, 1, context, DTYPE, mode), 0


def memo_bytes(cfg, distinct: int, context: int, mode: str) -> int:
    """Device bytes of the benchmark's prefill memo: the caches of `distinct` passages."""
    return distinct * cache_bytes(cfg, 1, context, DTYPE, mode)


def make_plan(cfg, methods, contexts, pools, budget_bytes: dict[str, int], host_budget: int, headroom: int,
              explicit_batches=None, quick: bool = False, distinct: int = 0,
              device_limit: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> list[dict]:
    """One entry per (context, method, pool): per-sequence memory, the largest batch under each
    budget, and the batches to run. A pool of "fit" (offloaded methods) is, per budget, the largest
    pool that keeps that budget's largest batch (the batch the host memory bounds): the device memory
    the dense run would spend on K/V goes to the slot pool. It runs at that batch only.
    `distinct`: prefilled passages the benchmark keeps on the device while the offloaded runs of a
    context go (`measure_model`'s memo). `fit_pool_slots` leaves room for one prefill (what the
    generator counts: a prefill group of one in calls of `prefill_chunk` tokens, and its staging
    copies; here the group is copied from the memo); the
    memo is the benchmark's own, so it counts against the real card (`device_limit`, default the
    largest budget), not against an emulated smaller budget: at 8B / 128K / 27 sequences under the
    full card the 31.5x pool did not fit beside the 16 GiB memo (session 9), and the 27.8x pool not
    beside the memo and a prefill group of four (session 10)."""
    from nosa_jax.generate import pinned_host_limit_bytes

    pinned_pool = pinned_host_limit_bytes()  # the offloaded store must be placed in it (GPU only) ...
    if pinned_pool is not None:  # ... leaving room for the transfers' own pinned buffers
        pinned_pool -= PINNED_MARGIN
    card = device_limit if device_limit is not None else max(budget_bytes.values(), default=0)
    entries = []
    for ctx in contexts:
        K = num_selected(cfg, ctx)
        for method in methods:
            mode, off = method_mode(method)
            kind = "dense" if mode == "full" else ("offloaded" if off else "sparse_on_device")

            def max_batch(b, slots):
                return capacity_plan(cfg, DTYPE, context=ctx, gpu_budget=b - headroom, host_budget=host_budget,
                                     mode=mode if mode != "full" else "nosa", pool_slots=slots,
                                     pinned_pool=pinned_pool, prefill_chunk=prefill_chunk)[kind]["max_batch"]

            for mult in (pools if off else [None]):
                if mult == "fit":
                    for label, b in budget_bytes.items():
                        batch = max_batch(b, K)  # a top-k pool's largest batch, then the largest pool for it
                        if batch:
                            memo = memo_bytes(cfg, min(distinct, batch), ctx, mode)
                            room = min(b, card - memo) - headroom - weight_bytes(cfg, DTYPE)
                            slots = fit_pool_slots(cfg, batch, ctx, DTYPE, mode, room, prefill_chunk)
                            dev, host = per_seq_bytes(cfg, method, ctx, slots)
                            entries.append(dict(context=ctx, method=method, pool_mult=slots / K, pool_slots=slots,
                                                topk=K, max_batch={label: batch}, batches=[batch],
                                                device_bytes_per_seq=dev, host_bytes_per_seq=host))
                    continue
                slots = mult * K if mult else None
                maxb = {label: max_batch(b, slots) for label, b in budget_bytes.items()}
                top = max(maxb.values(), default=0)
                # batch list: numbers, and "max" for each budget's largest batch
                spec = explicit_batches or ([16, "max"] if quick else [4**i for i in range(12)] + ["max"])
                batches = [b for b in spec if b != "max" and b <= top]
                if "max" in spec:
                    batches += [m for m in maxb.values() if m > 0]
                dev, host = per_seq_bytes(cfg, method, ctx, slots)
                entries.append(dict(context=ctx, method=method, pool_mult=mult, pool_slots=slots, topk=K,
                                    max_batch=maxb, batches=sorted(set(batches)), device_bytes_per_seq=dev,
                                    host_bytes_per_seq=host))
    return entries


def print_plan(model_name, cfg, entries, steps, n_windows, distinct):
    print(f"plan for {model_name}: weights {weight_bytes(cfg, DTYPE) / GiB:.2f} GiB", flush=True)
    total = 0.0
    for e in entries:
        fl = [roofline(cfg, DTYPE, method_mode(e["method"])[0], e["context"], b)["floor_s"] for b in e["batches"]]
        # rough: compile + profile ~15 s a run, windows at ~2x the floor, offloaded prefill ~10k tokens/s
        est = sum(15 + 2 * f * steps * n_windows for f in fl)
        total += est
        print(f"  ctx {e['context']:6d} {e['method']:17s} pool {pool_label(e['pool_mult']):9s} "
              f"dev {e['device_bytes_per_seq'] / 2**20:8.1f} MiB/seq host {e['host_bytes_per_seq'] / 2**20:8.1f} MiB/seq "
              f"max batch {e['max_batch']} -> runs {e['batches']}  (~{est:.0f} s)", flush=True)
    pre = {(method_mode(e["method"])[0], e["context"]) for e in entries if method_mode(e["method"])[1] and e["batches"]}
    pre_s = sum(distinct * (ctx - 1024) / 10e3 for _, ctx in pre)  # ~10k tokens/s (8B on the H200, bench/offload.py)
    print(f"  rough estimate: {total / 60:.1f} min of runs + {pre_s / 60:.1f} min of offloaded prefills (8B pace)",
          flush=True)


# ----------------------------------------------------------------------------------------- measuring
def tiled_generator_class():
    from nosa_jax.generate import Generator

    class TiledPrefill(Generator):
        """A Generator whose prefill gives each sequence a copy of the prefilled cache of its prompt
        from `memo` (index of padded prompt rows, cache, logits): the distinct passages are
        prefilled once per (mode, context) and tiled over every batch."""

        def __init__(self, model, memo, **kw):
            super().__init__(model, **kw)
            self.memo = memo

        def _prefill(self, ids, lengths, capacity, rope_len, chunk):
            index, cache, logits = self.memo
            idx = jnp.asarray([index[r.tobytes()] for r in ids], jnp.int32)
            return (jax.tree.map(lambda x: jnp.take(x, idx, axis=1 if x.ndim > 1 else 0), cache),
                    jnp.take(logits, idx, axis=0))

    return TiledPrefill


def padded_ids(prompts, chunk: int) -> np.ndarray:
    """The id rows as `Generator.start` lays them out (padded to whole chunks)."""
    Tp = max(len(p) for p in prompts)
    chunk = min(chunk, Tp) if chunk else Tp
    ids = np.zeros((len(prompts), -(-Tp // chunk) * chunk), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    return ids


def device_state(model, cfg, batch: int, capacity: int, length: int, n_tokens: int):
    """Decode state of an on-device run: a random cache holding `length` tokens per sequence."""
    from bench.generate import random_cache
    from nosa_jax.generate import PAD, DecodeState

    cache = random_cache(model, batch, length, capacity, jax.random.key(batch))
    st = DecodeState(cache=cache, tokens=jnp.full((batch, n_tokens), PAD, jnp.int32),
                     logits=jnp.zeros((batch, 0, cfg.vocab_size), jnp.float32), last=jnp.zeros((batch,), jnp.int32),
                     done=jnp.zeros((batch,), bool), step=jnp.zeros((), jnp.int32), key=jax.random.key(0))
    # committed like Generator.start's state, so the decode loop compiles once
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), (st, jnp.zeros((batch, cfg.vocab_size), jnp.float32)))


def run_records(cfg, model_name, entry, batch, w, steps, extra_settings, stats=None, prefill_s=None) -> tuple[list, dict]:
    """Records of one measured run (and a flat dict of its values for the table)."""
    from nosa_jax.generate import offload_statistics

    mode, off = method_mode(entry["method"])
    step_s = statistics.median(w.times) / steps
    scopes = {k: v / steps for k, v in split_by_scope(w.events, SCOPES, w.op_names).items()}  # us/step
    parts = {k: scopes[k] for k in STEP_PARTS} | {"rest": sum(scopes[k] for k in ("rest", "flush", "append", "slots"))}
    res = {"throughput": (batch / step_s, "tokens/s"), "step_time": (step_s * 1e3, "ms"),
           "step_time_spread": (max(w.times) / min(w.times), "max/min"),
           "compile_and_first_window": (w.compile_s, "s"),
           "device_time_per_step": (sum(scopes.values()), "us"),
           "device_bytes_per_seq": (entry["device_bytes_per_seq"], "bytes"),
           "host_bytes_per_seq": (entry["host_bytes_per_seq"], "bytes")}
    res |= {f"split_{k}": (v, "us") for k, v in parts.items()}
    res |= {f"device_time_{k}": (v, "us") for k, v in scopes.items()}
    pcie = 0.0
    if off:
        s = offload_statistics(stats, cfg, DTYPE, mode, batch)
        pcie = float(np.mean(s["bytes"].sum(axis=1))) if s["bytes"].size else 0.0
        res |= {"gamma": (s["gamma_mean"], "ratio"), "misses_per_layer_head_seq_step": (s["misses_per_layer_head_seq"], "blocks"),
                "hit_rate": (s["hit_rate_mean"], "ratio"), "prefill_time_distinct": (prefill_s or 0.0, "s")}
    rf = roofline(cfg, DTYPE, mode, entry["context"], batch, pcie)
    res |= {"pcie_bytes_per_step": (rf["pcie_bytes"], "bytes"), "hbm_bytes_per_step": (rf["hbm_bytes"], "bytes"),
            "floor_weights_time": (rf["weights_s"] * 1e3, "ms"), "floor_kv_time": (rf["kv_s"] * 1e3, "ms"),
            "floor_compressed_time": (rf["compressed_s"] * 1e3, "ms"), "floor_pcie_time": (rf["pcie_s"] * 1e3, "ms"),
            "floor_time": (rf["floor_s"] * 1e3, "ms"), "floor_time_overlap": (rf["floor_overlap_s"] * 1e3, "ms"),
            "measured_over_floor": (step_s / rf["floor_s"], "x")}
    rates = extra_settings.get("host_read_gbps")
    if rates and off:  # the floor again with the misses at this host's measured in-place read rate
        host_floor = rf["hbm_s"] + rf["pcie_bytes"] / (rates["in_place"] * 1e9)
        res |= {"floor_time_host": (host_floor * 1e3, "ms"), "measured_over_floor_host": (step_s / host_floor, "x")}
    settings = {"model": model_name, "method": entry["method"], "mode": mode,
                "placement": "offloaded" if off else "device", "pool_slots": entry["pool_slots"],
                "pool": pool_label(entry["pool_mult"]), "context": entry["context"], "batch": batch,
                "steps_per_window": steps, "repeats": len(w.times), "dtype": "bfloat16",
                "max_batch": entry["max_batch"]} | extra_settings
    return [record("throughput/decode", settings, m, v, u) for m, (v, u) in res.items()], settings


def error_record(model_name, entry, batch, exc) -> dict:
    settings = {"model": model_name, "method": entry["method"], "pool": pool_label(entry["pool_mult"]),
                "pool_slots": entry["pool_slots"], "context": entry["context"], "batch": batch,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return record("throughput/decode", settings, "failed", 1, "")


def results_stem(model_name: str, tag: str) -> str:
    return f"throughput-{model_name}{'-' + tag if tag else ''}"


def decode_windows(args) -> int:
    """Decode windows a run takes: 2 warm-up, the timed and 1 profiled; with --ab, 2 warm-up and the
    timed per variant. Each context's prompts leave room for this many windows per pool."""
    return len(args.ab) * (args.repeats + 2) if args.ab else args.repeats + 3


def measure_model(model_name: str, args, budget_bytes, host_budget, headroom, kept=()) -> list[dict]:
    """Measure the plan's runs of one model; `kept`: records of runs measured earlier (--resume),
    which are not run again and stay in the results."""
    from flax import nnx

    from nosa_jax.generate import Generator, OffloadSettings
    from nosa_jax.model import NosaForCausalLM
    from pallas_kernels.kv_loader import loader_path

    cfg = ModelConfig(**MODELS[model_name])
    n_windows = decode_windows(args)
    card = max(device_bytes_limit(), *budget_bytes.values())  # a CPU dry run: the budgets
    entries = make_plan(cfg, args.modes, args.contexts, args.pools, budget_bytes, host_budget, headroom,
                        args.batches, args.quick, args.distinct, card, args.prefill_chunk)
    print_plan(model_name, cfg, entries, args.steps, n_windows, args.distinct)
    records = []
    for label, b in budget_bytes.items():
        for e in [e for e in entries if label in e["max_batch"]]:  # a "fit" pool belongs to one budget
            records.append(record("throughput/plan", {"model": model_name, "method": e["method"],
                                                      "pool": pool_label(e["pool_mult"]), "pool_slots": e["pool_slots"],
                                                      "context": e["context"], "budget": label, "budget_bytes": b,
                                                      "headroom_bytes": headroom, "host_budget_bytes": host_budget},
                                  "max_batch", e["max_batch"][label], "sequences"))
    if args.dry_run:
        return records
    kept = [r for r in kept if r["name"] == "throughput/decode" and r["settings"].get("model") == model_name
            and r["metric"] != "failed"]
    records += kept
    done = {(r["settings"]["method"], r["settings"]["pool"], r["settings"]["context"], r["settings"]["batch"])
            for r in kept}

    def todo(e, batch) -> bool:
        return (e["method"], pool_label(e["pool_mult"]), e["context"], batch) not in done

    loader = loader_path(args.loader)
    kernels = kernel_choices(parse_kernels(args.kernels))
    ab_variants = [parse_kernels(v) for v in args.ab or ()]  # --ab: each run compares these instead

    rates = None  # this host's pinned read rates, measured before anything big is allocated
    if not args.ab and any(method_mode(e["method"])[1] and e["batches"] for e in entries):
        try:
            rates = host_read_rates()
            print(f"this host's pinned reads: in place {rates['in_place']:.1f} GB/s, bulk copy "
                  f"{rates['bulk']:.1f} GB/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - the runs do not need it; their records then lack it
            print(f"host read rates not measured: {exc!r}"[:300], flush=True)

    def keep(new: list[dict]) -> None:
        """Add a run's records and save all so far: a process stopped later (a device call's time
        limit) still leaves every finished run on disk; the final save overwrites this one."""
        records.extend(new)
        save(records, results_stem(model_name, args.tag), "(partial: the run was still going)\n")

    for mode in [m for m in ("full", "infllmv2", "nosa") if any(method_mode(x)[0] == m for x in args.modes)]:
        mine = [e for e in entries if method_mode(e["method"])[0] == mode and e["batches"]]
        if not mine:
            continue
        t0 = time.perf_counter()
        model = NosaForCausalLM(cfg, mode=mode, dtype=DTYPE, rngs=nnx.Rngs(0), layer_unroll=layer_unroll(args))
        print(f"[{model_name} {mode}] model built in {time.perf_counter() - t0:.1f} s", flush=True)
        for ctx in args.contexts:
            # the same number of new tokens for every run at this context: one prefill serves all
            n_pools = len(args.pools)
            new = n_pools * n_windows * args.steps + 2
            length = ctx - new
            # ---- on the device (random cache)
            for e in [e for e in mine if e["context"] == ctx and not method_mode(e["method"])[1]]:
                gen = Generator(model, eos_ids=())
                for batch in [b for b in e["batches"] if todo(e, b)]:
                    try:
                        st, logits = device_state(model, cfg, batch, ctx, length, n_windows * args.steps + 2)
                        if args.ab:
                            ab = ab_windows(gen, st, logits, args.steps, args.repeats, ab_variants)
                            keep(ab_records(model_name, e, batch, ab, args, kernels))
                            continue
                        w = timed_windows(gen, st, logits, args.steps, args.repeats, profile=not args.no_profile)
                        recs, _ = run_records(cfg, model_name, e, batch, w, args.steps,
                                              {"fill": "random cache (decode cost does not depend on the values)",
                                               "kernels": kernels, "layer_unroll": layer_unroll(args)})
                        keep(recs)
                        report_line(recs)
                        if w.events and args.verbose:
                            print_profile(w.events, w.op_names, args.steps, args.top)
                    except Exception as exc:  # noqa: BLE001 - one failed run (e.g. out of memory) must not end the table
                        print(f"  FAILED {e['method']} ctx {ctx} batch {batch}: {exc!r}"[:400], flush=True)
                        traceback.print_exc(limit=2)
                        keep([error_record(model_name, e, batch, exc)])
                    finally:
                        st = logits = w = None  # free the cache before the next run (also after a failure)
            # ---- offloaded (real text, `distinct` passages prefilled once and tiled)
            off = [e for e in mine if e["context"] == ctx and method_mode(e["method"])[1]]
            if not off:
                continue
            # largest batch first: its pinned store (tens of GiB) is then the first allocation in the
            # host pool; after smaller runs the pool could not place a 47.9 GiB store at 8B / 16K
            # (bench/results/throughput-8b-s4-2026-11-28, failed runs)
            batches = sorted({b for e in off for b in e["batches"] if todo(e, b)}, reverse=True)
            if not batches:
                continue
            u = min(args.distinct, max(batches))
            distinct = prompts_from_text(u, length, cfg.vocab_size)
            TiledPrefill = tiled_generator_class()
            try:
                t0 = time.perf_counter()
                base = Generator(model, eos_ids=())
                ids = padded_ids(distinct, args.prefill_chunk)
                lens = np.full((u,), length, np.int32)
                cache, lg = base._prefill(ids, lens, ctx, lens + new, min(args.prefill_chunk, length))
                jax.block_until_ready(lg)
                prefill_s = time.perf_counter() - t0
                memo = ({r.tobytes(): i for i, r in enumerate(ids)}, cache, lg)
                print(f"[{model_name} {mode} ctx {ctx}] prefilled {u} distinct passages in {prefill_s:.1f} s", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  FAILED prefill {mode} ctx {ctx}: {exc!r}"[:400], flush=True)
                keep([error_record(model_name, e, b, exc) for e in off for b in e["batches"] if todo(e, b)])
                continue
            for batch in batches:
                here = [e for e in off if batch in e["batches"] and todo(e, batch)]
                w = None
                try:
                    # the generator prefills as many sequences at a time as the device holds beside
                    # the pool; the memo stays on the device meanwhile, so it is not part of the budget
                    # (a fixed group of `distinct` did not fit beside the full-card fit pool: session 10)
                    gen = TiledPrefill(model, memo, eos_ids=(), offload=OffloadSettings(
                        pool_slots=here[0]["pool_slots"], loader=args.loader, host_memory_budget=host_budget))
                    prompts = [distinct[i % u] for i in range(batch)]
                    kv_budget = card - weight_bytes(cfg, DTYPE) - memo_bytes(cfg, u, ctx, mode) - headroom
                    st, logits, _ = gen.start(prompts, max_new_tokens=new, prefill_chunk=args.prefill_chunk,
                                              memory_budget=kv_budget)
                except Exception as exc:  # noqa: BLE001
                    print(f"  FAILED offloaded start {mode} ctx {ctx} batch {batch}: {exc!r}"[:400], flush=True)
                    keep([error_record(model_name, e, batch, exc) for e in here])
                    st = logits = gen = None
                    continue
                if args.verbose and (m := device_memory_line(f"after the start of batch {batch}")):
                    print(m, flush=True)
                for e in here:
                    try:
                        st = dataclasses.replace(st, cache=empty_pool(st.cache, e["pool_slots"]))
                        # what this entry's pool leaves free (the full-card fit pool ran short, session 9)
                        if args.verbose and (m := device_memory_line(f"with the {e['pool_slots']}-slot pool")):
                            print(m, flush=True)
                        if args.verbose:  # what the loop itself asks for beyond its arguments
                            print(compiled_memory_line(decode_loop.lower(
                                gen.graphdef, gen.state, st, logits, sampler=gen.sampler, eos_ids=(),
                                n_steps=args.steps).compile(), "decode loop"), flush=True)
                        if args.ab:
                            ab = ab_windows(gen, st, logits, args.steps, args.repeats, ab_variants)
                            st, logits = ab.st, ab.logits
                            stats = np.asarray(st.stats)[ab.first_step:int(st.step)]
                            keep(ab_records(model_name, e, batch, ab, args, kernels, cfg=cfg, stats=stats))
                            continue
                        w = timed_windows(gen, st, logits, args.steps, args.repeats, profile=not args.no_profile)
                        st, logits = w.st, w.logits
                        stats = np.asarray(st.stats)[w.first_step:int(st.step)]
                        recs, _ = run_records(cfg, model_name, e, batch, w, args.steps,
                                              {"fill": f"stdlib source text, 1 byte/token, {u} distinct passages tiled",
                                               "loader": loader, "kernels": kernels,
                                               "layer_unroll": layer_unroll(args), "host_read_gbps": rates},
                                              stats=stats, prefill_s=prefill_s)
                        keep(recs)
                        report_line(recs)
                        if w.events and args.verbose:
                            print_profile(w.events, w.op_names, args.steps, args.top)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  FAILED {e['method']} ctx {ctx} batch {batch}: {exc!r}"[:400], flush=True)
                        traceback.print_exc(limit=2)
                        keep([error_record(model_name, e, batch, exc)])
                        break  # the state was donated to the failed call: go on with the next batch
                st = logits = gen = w = None
            memo = cache = lg = None
        model = None
    return records


def ab_records(model_name, entry, batch, ab, args, kernels, cfg=None, stats=None) -> list[dict]:
    """Records ("throughput/ab", apart from the table's "throughput/decode") of one --ab run, and
    its printed line: per variant the median step time, and against the first variant the median,
    least and largest ratio of the rounds' paired windows."""
    from nosa_jax.generate import offload_statistics

    base = {"model": model_name, "method": entry["method"], "pool": pool_label(entry["pool_mult"]),
            "pool_slots": entry["pool_slots"], "context": entry["context"], "batch": batch,
            "steps_per_window": args.steps, "repeats": args.repeats, "variants": list(args.ab),
            "layer_unroll": layer_unroll(args)}
    extra = []
    if stats is not None and len(stats):
        s = offload_statistics(stats, cfg, DTYPE, method_mode(entry["method"])[0], batch)
        extra = [("misses_per_layer_head_seq_step", s["misses_per_layer_head_seq"], "blocks"),
                 ("gamma", s["gamma_mean"], "ratio")]
    recs, parts = [], []
    t0 = np.asarray(ab.times[0])
    for label, times in zip(args.ab, ab.times):
        t = np.asarray(times)
        step_s = float(np.median(t)) / args.steps
        ratio = t / t0  # round i's window against the first variant's window of the same round
        settings = base | {"variant": label, "kernels": kernels | parse_kernels(label),
                           "window_times_s": [float(x) for x in t]}
        vals = [("step_time", step_s * 1e3, "ms"), ("throughput", batch / step_s, "tokens/s"),
                ("step_time_vs_first", float(np.median(ratio)), "x"),
                ("paired_ratio_min", float(ratio.min()), "x"), ("paired_ratio_max", float(ratio.max()), "x")] + extra
        recs += [record("throughput/ab", settings, m, v, u) for m, v, u in vals]
        parts.append(f"{label} {step_s * 1e3:.2f} ms/step ({batch / step_s:.0f} tok/s)"
                     + ("" if label == args.ab[0] else
                        f" x{np.median(ratio):.3f} [{ratio.min():.3f}-{ratio.max():.3f}]"))
    print(f"  A/B {entry['method']} pool {pool_label(entry['pool_mult'])} ctx {entry['context']} batch {batch}, "
          f"{len(t0)} rounds: " + "; ".join(parts)
          + (f"; misses {extra[0][1]:.2f}" if extra else ""), flush=True)
    return recs


def report_line(recs):
    v = {r["metric"]: r["value"] for r in recs}
    s = recs[0]["settings"]
    print(f"  {s['method']:17s} pool {s['pool']:9s} ctx {s['context']:6d} batch {s['batch']:4d}: "
          f"{v['throughput']:9.1f} tok/s  {v['step_time']:7.2f} ms/step  floor {v['floor_time']:6.2f} ms "
          f"(x{v['measured_over_floor']:.2f}"
          + (f"; x{v['measured_over_floor_host']:.2f} of {v['floor_time_host']:.2f} at this host's in-place rate"
             if "floor_time_host" in v else "") + ")  sel/loads/attn/gemm/rest "
          + "/".join(f"{v['split_' + k] / 1e3:.2f}" for k in STEP_PARTS)
          + (f"  gamma {v['gamma']:.3f} misses {v['misses_per_layer_head_seq_step']:.2f}" if "gamma" in v else ""),
          flush=True)


# -------------------------------------------------------------------------------------------- report
def collect(records) -> tuple[dict, dict, list]:
    """(runs {(model, method, pool, context, batch): {metric: value, '_settings': ...}},
    plans {(model, method, pool, context, budget): max batch}, failures). A failure that a later
    record of the same model, method, context and batch (any pool) ran past is left out: merged
    files list what fails now, not what an earlier session fixed."""
    runs, plans, fails, last_ok = {}, {}, [], {}
    for i, r in enumerate(records):
        s = r["settings"]
        if r["name"] == "throughput/plan":
            plans[(s["model"], s["method"], s["pool"], s["context"], s["budget"])] = int(r["value"])
        elif r["name"] == "throughput/decode":
            what = (s.get("model"), s.get("method"), s.get("context"), s.get("batch"))
            if r["metric"] == "failed":
                fails.append((i, what, s))
                continue
            last_ok[what] = i
            k = (s["model"], s["method"], s["pool"], s["context"], s["batch"])
            runs.setdefault(k, {"_settings": s})[r["metric"]] = r["value"]
    return runs, plans, [s for i, what, s in fails if last_ok.get(what, -1) < i]


def _f(x, fmt="{:.0f}"):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def has_split(v: dict) -> bool:
    """Whether the run has a step split (it ran a profiled window: not with --no-profile)."""
    return v.get("device_time_per_step", 0) > 0


def responsible(v: dict) -> str:
    """The part of the step furthest above its share of the floor (ms)."""
    if not has_split(v):
        return "no step split (run without the profiler)"
    floor = {"selection": v.get("floor_compressed_time", 0), "loads": v.get("floor_pcie_time", 0),
             "attention": v.get("floor_kv_time", 0), "gemm": v.get("floor_weights_time", 0), "rest": 0.0}
    label = {"gemm": "GEMMs", "rest": "rest (the small kernels: slot update, cache writes, norms, rope, residuals)"}
    if "split_gemm" not in v:  # records from before session 20: the GEMMs are inside "rest"
        floor["rest"] = floor.pop("gemm")
        label["rest"] = "rest (GEMMs and the small kernels)"
    if floor["loads"] and not v.get("split_loads"):  # misses read inside the attention kernel (LOADS "fused")
        floor["attention"] += floor.pop("loads")
        label["attention"] = "attention (with the misses' PCIe reads)"
    ex = {label.get(k, k): v.get(f"split_{k}", 0) / 1e3 - f for k, f in floor.items()}
    ex["idle (host/launch gaps)"] = v["step_time"] - v.get("device_time_per_step", 0) / 1e3
    k = max(ex, key=ex.get)
    return f"{k} +{ex[k]:.2f} ms over its floor"


def equivalent(runs, plans, model, budget, ctx, method, pool):
    """The run of `method` at its own largest batch under `budget` (None if not measured)."""
    b = plans.get((model, method, pool, ctx, budget))
    return b, (runs.get((model, method, pool, ctx, b)) if b else None)


def build_report(records) -> str:
    runs, plans, fails = collect(records)
    out = []
    header = ["model", "context", "method", "pool", "batch", "tok/s", "ms/step", "sel ms", "loads ms", "attn ms",
              "GEMM ms", "rest ms", "idle ms", "dev MiB/seq", "host MiB/seq", "gamma", "misses", "floor ms", "meas/floor"]
    rows = []
    for k in sorted(runs, key=lambda k: (k[0], k[3], method_key(k[1:3]), k[4])):
        v = runs[k]
        split = has_split(v)  # else "—": a run without the profiled window has no split
        idle = v["step_time"] - v["device_time_per_step"] / 1e3 if split else None
        rows.append([k[0], k[3], LABELS.get(k[1], k[1]), k[2], k[4], _f(v["throughput"]), _f(v["step_time"], "{:.2f}")]
                    + [_f(v[f"split_{p}"] / 1e3 if split and f"split_{p}" in v else None, "{:.2f}")
                       for p in STEP_PARTS] + [_f(idle, "{:.2f}"),
                       _f(v["device_bytes_per_seq"] / 2**20, "{:.1f}"), _f(v["host_bytes_per_seq"] / 2**20, "{:.1f}"),
                       _f(v.get("gamma"), "{:.3f}"), _f(v.get("misses_per_layer_head_seq_step"), "{:.2f}"),
                       _f(v["floor_time"], "{:.2f}"), _f(v["measured_over_floor"], "{:.2f}")])
    out.append("## All runs\n\nSplit: device time per step by named scope (profiler); GEMM: the matrix products "
               "(by kernel name; records before session 20 have them in rest); idle = step time - device "
               "time. Floor: HBM bytes at 4.3 TB/s + missed blocks at 53 GB/s. misses: per (layer, kv head, "
               "sequence, step).\n\n" + markdown_table(header, rows))
    # equivalent batch
    budgets_seen = sorted({k[4] for k in plans}, key=lambda b: (b.startswith("full"), b))
    models = sorted({k[0] for k in plans} | {k[0] for k in runs})
    contexts = sorted({k[3] for k in plans} | {k[3] for k in runs})
    methods = sorted({(k[1], k[2]) for k in plans} | {(k[1], k[2]) for k in runs}, key=method_key)
    rows = []
    for model in models:
        for budget in budgets_seen:
            for ctx in contexts:
                fb, fr = equivalent(runs, plans, model, budget, ctx, "full", "-")
                for method, pool in methods:
                    b, r = equivalent(runs, plans, model, budget, ctx, method, pool)
                    if b is None:
                        continue
                    sp = r["throughput"] / fr["throughput"] if r and fr else None
                    rows.append([model, budget, ctx, LABELS.get(method, method), pool,
                                 b if b else "0 (does not fit)", _f(r and r["throughput"]), _f(sp, "{:.2f}x")])
    out.append("## Equivalent batch: each method at its own largest batch under one GPU memory budget\n\n"
               + markdown_table(["model", "budget", "context", "method", "pool", "batch", "tok/s", "vs FullAttn"], rows))
    # same batch
    rows = []
    for model in models:
        for ctx in contexts:
            for b in sorted({k[4] for k in runs if k[0] == model and k[3] == ctx}):
                here = {(k[1], k[2]): v for k, v in runs.items() if k[0] == model and k[3] == ctx and k[4] == b}
                if len(here) < 2:
                    continue
                rows.append([model, ctx, b] + [_f(here.get(m, {}).get("throughput")) for m in methods])
    out.append("## Same batch: all methods at one batch (tok/s)\n\n"
               + markdown_table(["model", "context", "batch"] + [f"{LABELS.get(m, m)} {p}".replace(" -", "")
                                                                 for m, p in methods], rows))
    out.append(anchors(runs, plans, budgets_seen, sorted({r.get("device", "?") for r in records})))
    if fails:
        out.append("## Failed runs\n\n" + markdown_table(["model", "method", "pool", "context", "batch", "error"],
                                                         [[s.get("model"), s.get("method"), s.get("pool"), s.get("context"),
                                                           s.get("batch"), s.get("error", "")[:160]] for s in fails]))
    return "\n".join(out)


def anchors(runs, plans, budgets_seen, devices: list[str]) -> str:
    rows = []

    def verdict(value, target):
        if value is None:
            return "not measured"
        return ("met" if value >= target else "MISSED") + f" ({value / target:.2f}x of the target)"

    # 16K, batch 16, offloaded (the paper's H100 point)
    at_16k = {k[2] for k in runs if k[0] == "8b" and k[1] == "nosa-offload" and k[3] == 16384 and k[4] == 16}
    for pool in sorted(at_16k, key=lambda p: method_key(("", p))) or ["top-k", "2x top-k"]:
        n = runs.get(("8b", "nosa-offload", pool, 16384, 16))
        i = runs.get(("8b", "infllmv2-offload", pool, 16384, 16))
        tok = n["throughput"] if n else None
        why = ""
        if n and tok < TARGETS["nosa_16k_b16_tok_s"]:
            # the most this pool could give: the run's step at its roofline floor (weights, selected
            # KV, compressed keys and its misses over PCIe)
            bound = 16 / (n["floor_time"] / 1e3)
            why = (f"; at its roofline floor ({n['floor_time']:.2f} ms) this run would give {bound:.0f} tok/s"
                   + (" - below the target: with this pool's misses the target is out of reach"
                      if bound < TARGETS["nosa_16k_b16_tok_s"] else f"; {responsible(n)}"))
        rows.append([f"NOSA offload tok/s, 8B/16K/batch 16, pool {pool}",
                     f"{PAPER['nosa_16k_b16_tok_s']:.2f} (NOSA+NOSI, H100 PCIe 5)",
                     f">= {TARGETS['nosa_16k_b16_tok_s']:.0f}", _f(tok), verdict(tok, TARGETS["nosa_16k_b16_tok_s"]) + why])
        ratio = n["throughput"] / i["throughput"] if n and i else None
        rows.append([f"NOSA / InfLLMv2 offload, 8B/16K/batch 16, pool {pool}",
                     f"{PAPER['nosa_over_infllmv2_16k']:.2f}x (2551.66 / 1762.16 tok/s)",
                     f">= {TARGETS['nosa_over_infllmv2_16k']:.2f}x", _f(ratio, "{:.2f}x"),
                     verdict(ratio, TARGETS["nosa_over_infllmv2_16k"]) + (f"; InfLLMv2 {_f(i['throughput'])} tok/s"
                                                                           if i else "")])
    # equivalent batch vs FullAttn under the 80 GiB budget, at the longest context the host allows
    b80 = [b for b in budgets_seen if b.startswith("80 ")]
    for budget in b80 or budgets_seen[:1]:
        best = None
        for pool in sorted({k[2] for k in plans if k[1] == "nosa-offload"}):
            ctxs = [k[3] for k in plans if k[:3] == ("8b", "nosa-offload", pool) and k[4] == budget and plans[k] > 0]
            for ctx in sorted(ctxs, reverse=True):
                nb, nr = equivalent(runs, plans, "8b", budget, ctx, "nosa-offload", pool)
                fb, fr = equivalent(runs, plans, "8b", budget, ctx, "full", "-")
                if nr and fr:
                    sp = nr["throughput"] / fr["throughput"]
                    if best is None or (ctx, sp) > (best[0], best[1]):
                        best = (ctx, sp, pool, nb, fb, nr)
                    break
        if best:
            ctx, sp, pool, nb, fb, nr = best
            # the most this batch could give: NOSA offloaded at its roofline floor against the
            # measured FullAttn (whose batch the same budget fixes)
            bound = nb / (nr["floor_time"] / 1e3) / (nr["throughput"] / sp)
            why = ""
            if sp < TARGETS["speedup_vs_full"]:
                why = (f"; at its roofline floor this batch would give {bound:.2f}x"
                       + (" - below the target: the offloaded batch is too small, not the step too slow"
                          if bound < TARGETS["speedup_vs_full"] else f"; {responsible(nr)}"))
            rows.append([f"NOSA offload vs FullAttn, 8B, eq. batch under {budget}",
                         f"{PAPER['speedup_vs_full']:.2f}x (96K, eq. batch 64, A100 PCIe 4)",
                         f">= {TARGETS['speedup_vs_full']:.0f}x at the longest context host memory allows",
                         f"{sp:.2f}x at {ctx} (batch {nb} vs {fb}, pool {pool})",
                         verdict(sp, TARGETS["speedup_vs_full"]) + why])
        else:
            rows.append([f"NOSA offload vs FullAttn, 8B, eq. batch under {budget}", "5.04x (96K, eq. batch 64)",
                         ">= 5x", "—", "not measured"])
    # floors
    nosa = {k: v for k, v in runs.items() if k[1] in ("nosa", "nosa-offload")}
    if nosa:
        worst = max(nosa, key=lambda k: nosa[k]["measured_over_floor"])
        ok = sum(v["measured_over_floor"] <= TARGETS["floor_ratio"] for v in nosa.values())
        w = nosa[worst]
        rows.append(["every NOSA run within 1.3x of its roofline floor", "—", f"<= {TARGETS['floor_ratio']}x",
                     f"{ok}/{len(nosa)} runs; worst {w['measured_over_floor']:.2f}x ({worst[0]} {worst[1]} pool "
                     f"{worst[2]} ctx {worst[3]} batch {worst[4]})",
                     ("met" if ok == len(nosa) else f"MISSED by {w['measured_over_floor'] / TARGETS['floor_ratio']:.2f}x; "
                      f"{responsible(w)}")])
    return ("## Paper anchors and issue targets\n\nPaper numbers: shared/notes/perf-anchors.md (5.04x: A100, "
            "PCIe 4, 80 GB, 96K, equivalent batch 64; 2551.66 tok/s: H100, PCIe 5). Ours: "
            f"{', '.join(devices)}, random-weight models of the same shape, bf16.\n\n"
            + markdown_table(["quantity", "paper", "target", "ours", "verdict"], rows))


def plots(records, stem: str, dirs: list[Path]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'nosa-jax[bench]' or pip install matplotlib, "
              "then: python bench/throughput.py --report <the JSON files>)", flush=True)
        return []
    runs, plans, _ = collect(records)
    models = sorted({k[0] for k in runs})
    budgets_seen = sorted({k[4] for k in plans}, key=lambda b: (b.startswith("full"), b))
    methods = sorted({(k[1], k[2]) for k in runs}, key=method_key)
    if not models:
        return []
    figs = []
    # 1. tokens/s vs context per method, each at its equivalent batch under each budget
    fig, axes = plt.subplots(len(models), max(1, len(budgets_seen)), squeeze=False,
                             figsize=(6 * max(1, len(budgets_seen)), 4.2 * len(models)))
    for i, model in enumerate(models):
        for j, budget in enumerate(budgets_seen):
            ax = axes[i][j]
            for method, pool in methods:
                pts = []
                for ctx in sorted({k[3] for k in runs if k[0] == model}):
                    b, r = equivalent(runs, plans, model, budget, ctx, method, pool)
                    if r:
                        pts.append((ctx, r["throughput"], b))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                            label=f"{LABELS.get(method, method)}" + (f" ({pool})" if pool != "-" else ""))
                    for p in pts:
                        ax.annotate(f"B={p[2]}", (p[0], p[1]), fontsize=7, textcoords="offset points", xytext=(2, 3))
            if not ax.lines:  # nothing of this model ran under this budget: say so, no empty axes
                ax.axis("off")
                ax.text(0.5, 0.5, f"{model}: no runs under {budget}", ha="center", va="center")
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode tokens/s (all sequences)")
            ax.set_title(f"{model}, equivalent batch under {budget}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    figs.append((fig, f"{stem}-context.png"))
    # 2. step split bars, equivalent batch under the first budget
    budget = budgets_seen[0] if budgets_seen else None
    bars = []
    for model in models:
        for ctx in sorted({k[3] for k in runs if k[0] == model}):
            for method, pool in methods:
                b, r = equivalent(runs, plans, model, budget, ctx, method, pool) if budget else (None, None)
                if r is None:  # no plan: the largest batch measured
                    bs = [k[4] for k in runs if k[:4] == (model, method, pool, ctx)]
                    r = runs[(model, method, pool, ctx, max(bs))] if bs and not budget else None
                if r:
                    bars.append((f"{model} {ctx_label(ctx)}\n{LABELS.get(method, method)}" + (f"\n{pool}" if pool != "-" else "")
                                 + f"\nB={r['_settings']['batch']}", r))
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 5))
        x = np.arange(len(bars))
        bottom = np.zeros(len(bars))
        parts = list(STEP_PARTS) + ["idle", "not profiled"]

        def part_ms(r, p):  # a run without the profiled window is one "not profiled" bar
            if not has_split(r):
                return r["step_time"] if p == "not profiled" else 0.0
            if p == "idle":
                return r["step_time"] - r["device_time_per_step"] / 1e3
            return 0.0 if p == "not profiled" else r.get(f"split_{p}", 0.0) / 1e3  # no "gemm" before session 20

        for p in parts:
            vals = np.array([part_ms(r, p) for _, r in bars])
            if p == "not profiled" and not vals.any():
                continue
            ax.bar(x, vals, bottom=bottom, label=p, **({"color": "lightgray", "hatch": "//"} if p == "not profiled" else {}))
            bottom += vals
        ax.scatter(x, [r["floor_time"] for _, r in bars], marker="_", s=400, color="k", label="roofline floor", zorder=3)
        ax.set_xticks(x, [b[0] for b in bars], fontsize=6)
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"step time split (equivalent batch under {budget})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs.append((fig, f"{stem}-split.png"))
    written = []
    for fig, name in figs:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            fig.savefig(d / name, dpi=110)
            written.append(d / name)
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="nosa-jax bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="8b, 16K, the 80 GiB budget, batch 16 and each method's largest batch, 3 repeats")
    ap.add_argument("--models", nargs="+", help="8b 1b (default both; --quick: 8b)")
    ap.add_argument("--contexts", type=int, nargs="+", help="tokens per sequence (default 16K 32K 64K 128K)")
    ap.add_argument("--modes", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                    help=f"methods: {' '.join(METHODS)} (default all)")
    ap.add_argument("--pools", type=lambda x: x if x == "fit" else int(x), nargs="+", default=[1, 2, "fit"],
                    help='offloaded pool sizes in multiples of top-k; "fit": the largest pool that keeps each '
                         "budget's largest batch (the rest of the device budget goes to the pool)")
    ap.add_argument("--batches", type=lambda x: x if x == "max" else int(x), nargs="+",
                    help='batch sizes, "max" = each budget\'s largest (default: powers of 4 up to the largest that '
                         'fits, and max; --quick: 16 max)')
    ap.add_argument("--budgets-gb", nargs="+", help='GPU memory budgets in GiB, or "full" (default: 80 full)')
    ap.add_argument("--host-gb", type=float, default=None,
                    help="host memory budget (default: the pinned pool, 90%% of the RAM, or the free memory if less)")
    ap.add_argument("--headroom-gb", type=float, default=2.0, help="device memory kept free for activations")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed window (>= 32 for the table)")
    ap.add_argument("--repeats", type=int, help="timed windows per run (median; default 5, --quick 3)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct text passages of the offloaded runs")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--loader", choices=["auto", "pallas", "xla"], default="auto")
    ap.add_argument("--kernels", default="default", metavar="KEY=VALUE,...",
                    help=f"kernel choices for every run ({KERNEL_CHOICES_HELP}; default: the modules' defaults)")
    ap.add_argument("--ab", nargs="+", metavar="KERNELS",
                    help="compare kernel variants in one process instead of measuring the table: each run "
                         "alternates timed windows of these --kernels values (on top of --kernels) and reports "
                         "each one's step time and its paired ratio to the first (records 'throughput/ab'); "
                         "a variant may add XLA options for its decode program as xla_*=value items")
    add_layer_unroll_arg(ap)
    ap.add_argument("--tag", default="", help="suffix of the results' file names (parts of the table)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled window (no step split)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print each run's top kernels and idle gaps")
    ap.add_argument("--top", type=int, default=14, help="with --verbose: how many kernels to print per run")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (runs, batches, memory) and exit")
    ap.add_argument("--resume", nargs="+", metavar="JSON", default=[],
                    help="records of an earlier, stopped run of the same table (saved after every run): the runs "
                         "they hold are kept and not measured again, so one command can finish over several calls")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="tables and plots from saved records; no measuring")
    ap.add_argument("--out-dir", default=None, help="with --report: where to write (default: beside the first file)")
    args = ap.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from 8b 1b")
    for k in [args.kernels] + (args.ab or []):
        parse_kernels(k)  # a bad choice fails here, before any model is built
    if "xla" in parse_kernels(args.kernels):
        ap.error("--kernels: XLA options (xla_*=value) apply only to --ab variants")
    if args.ab and len(args.ab) < 2:
        ap.error("--ab needs at least two variants (e.g. --ab default finish=pallas)")
    if not args.report:
        new = len(args.pools) * decode_windows(args) * args.steps + 2
        short = [c for c in args.contexts if 2 * new > c]
        if short:
            ap.error(f"context(s) {short} are too short for the {new} decode steps of these windows (over "
                     f"half the context would be decoded rather than prefilled); use fewer --steps / "
                     f"--repeats / --pools / --ab variants or a longer context")
    args.kept = []  # the --resume records
    for f in args.resume:
        try:
            args.kept += json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--resume {f}: cannot read its records ({e}); pass the JSON an earlier run saved")
    if args.steps < 32:
        print(f"note: --steps {args.steps} < 32: not the issue's measurement (fine for a smoke test)", flush=True)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.report:
        records = [r for f in args.report for r in json.loads(Path(f).read_text())]
        out_dir = Path(args.out_dir) if args.out_dir else Path(args.report[0]).parent
        text = build_report(records)
        print(text)
        day = datetime.date.today().isoformat()
        stem = f"throughput-report{'-' + args.tag if args.tag else ''}"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}-{day}.md").write_text(text)
        written = [] if args.no_plots else plots(records, f"{stem}-{day}", [out_dir])
        print("wrote", out_dir / f"{stem}-{day}.md", *written)
        return 0
    from nosa_jax.generate import host_memory_bytes
    from pallas_kernels.kv_loader import loader_path

    print(f"device {jax.devices()[0]}  jax {jax.__version__}  loader {loader_path(args.loader)}", flush=True)
    enable_compilation_cache()  # the HLO of the time split comes from a second, cached compile
    budget_bytes = budgets(args.budgets_gb)
    # default: the pinned pool (90 % of the RAM, set above; free RAM if less), which a growing pool
    # reserves whole for a store above its largest power of two below the limit (64 GiB of 112 GiB;
    # nosa_jax.offload.pinned_pool_reservation)
    host_budget = int(args.host_gb * GiB) if args.host_gb else int(host_memory_bytes() or 0)
    headroom = int(args.headroom_gb * GiB)
    print(f"budgets: {', '.join(budget_bytes)}; host {host_budget / GiB:.1f} GiB; headroom {args.headroom_gb} GiB",
          flush=True)
    all_records = []
    for model_name in args.models:
        records = measure_model(model_name, args, budget_bytes, host_budget, headroom, args.kept)
        all_records += records
        if args.dry_run:
            continue
        if args.ab:  # the A/B lines above are the result; the table has no runs to show
            path = save(records, results_stem(model_name, args.tag), "(an --ab comparison: see its records)\n")
            print("wrote", path, flush=True)
            continue
        text = build_report(records)
        print(text)
        path = save(records, results_stem(model_name, args.tag), text)
        dirs = [path.parent] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
        written = [] if args.no_plots else plots(records, path.stem, dirs)
        print("wrote", path, path.with_suffix(".md"), *written, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
