"""Probe: how much pinned host memory an offloaded generation takes, phase by phase.

Session 6 found that offloaded runs failed for stores above ~2/3 of the pinned pool, asking for one
more buffer the size of one store array (K or V). This probe showed why (H200, jax 0.11.2,
bench/results/probe-host-peak-*): the decode program has no host temporary and the decode calls
allocate nothing; XLA's pinned pool grows by power-of-two regions, so two 2.02 GiB store arrays take
8.00 GiB, a 5 GiB limit cannot place them and a 7 GiB one can, as `nosa_jax.generate.
pinned_pool_reservation` predicts. XLA_PJRT_GPU_HOST_MEMORY_PREALLOCATE=true is no way out: it pins a
staging pool of the limit's size too (a 5 GiB limit pinned 10 GiB). It shows, phase by phase:

  1. the process's resident / locked memory (/proc/self/status) after each phase: the empty store,
     the prefill, the decode loop's compile, its first and second call;
  2. the compiled decode loop's memory analysis (device and host arguments, outputs, aliases and
     temporaries);
  3. with --dump DIR: XLA's dump of the decode loop (HLO after optimisations and the buffer
     assignment); the allocations of at least a quarter of the store are printed with their values.
  With --arrays-only it only allocates the store's arrays (no generator, so none of its up-front
  checks), prints what nosa_jax.generate.pinned_pool_reservation predicts for the pool set by
  XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB / _PREALLOCATE, and what the process then holds, or the error.

    python bench/probe_host_peak.py [--model 1b] [--layers 4] [--batch 32] [--capacity 32768]
                                    [--prompt 2048] [--steps 32] [--dump DIR] [--arrays-only]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", help="a shape of nosa_jax.config.SHAPES, or 'tiny' (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random model (the store scales with it)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--capacity", type=int, default=32768, help="tokens per sequence the store holds")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per call")
    ap.add_argument("--dump", default=None, help="XLA dump folder for the decode loop's program")
    ap.add_argument("--arrays-only", action="store_true",
                    help="only allocate the store's arrays and compare with the pool model's prediction")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.dump:  # read when the backend starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={ARGS.dump}"
                               " --xla_dump_hlo_module_re=.*decode_loop.*").strip()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from nosa_jax.config import SHAPES, ModelConfig, NosaConfig  # noqa: E402
from nosa_jax.generate import (Generator, OffloadSettings, decode_loop, pinned_host_limit_bytes,  # noqa: E402
                               pinned_pool_preallocated, pinned_pool_reservation)
from nosa_jax.model import NosaForCausalLM  # noqa: E402
from nosa_jax.offload import init_offloaded, offload_bytes, pool_size  # noqa: E402

GiB = 2**30
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
            nosa=NosaConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=8,
                            qk_select=5))


def process_memory() -> dict[str, float]:
    """GiB of the process's resident, locked and pinned memory (Linux), {} elsewhere."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmLck", "VmPin"):
                out[key] = int(val.split()[0]) * 1024 / GiB
    except OSError:
        pass
    return out


def main() -> int:
    a = ARGS
    shape = dict(TINY if a.model == "tiny" else SHAPES[a.model])
    shape["num_hidden_layers"] = a.layers
    shape["max_position_embeddings"] = max(shape.get("max_position_embeddings", 0), a.capacity)
    cfg = ModelConfig(**shape)
    dtype = jnp.bfloat16
    before = process_memory()  # before the backend starts (a preallocated pinned pool is taken then)
    last = dict(before)

    def phase(name):
        nonlocal last
        now = process_memory()
        delta = {k: now[k] - last.get(k, 0.0) for k in now}
        total = {k: now[k] - before.get(k, 0.0) for k in now}
        dev = jax.devices()[0].memory_stats() or {}
        peak = (f" | device in use {dev.get('bytes_in_use', 0) / GiB:.2f}, peak {dev.get('peak_bytes_in_use', 0) / GiB:.2f},"
                f" largest {dev.get('largest_alloc_size', 0) / GiB:.2f} GiB" if dev else "")
        print(f"[{name}] delta " + " ".join(f"{k} {v:+.2f}" for k, v in delta.items()) +
              " | since start " + " ".join(f"{k} {v:+.2f}" for k, v in total.items()) + " GiB" + peak, flush=True)
        last = now

    print(f"device {jax.devices()[0]}  jax {jax.__version__}", flush=True)
    phase("backend started")
    model = NosaForCausalLM(cfg, mode="nosa", dtype=dtype, rngs=nnx.Rngs(0))
    slots = pool_size(cfg, a.capacity)
    dev_b, host_b = offload_bytes(cfg, a.batch, a.capacity, dtype, "nosa", slots)
    print(f"store: {host_b / GiB:.2f} GiB on the host (one array); "
          f"{dev_b / GiB:.2f} GiB on the device", flush=True)
    if a.arrays_only:
        limit, pre = pinned_host_limit_bytes(), pinned_pool_preallocated()
        if limit is not None:
            pred = pinned_pool_reservation([host_b], limit, preallocated=pre)
            print(f"pool {limit / GiB:.1f} GiB, preallocated {pre}: the model predicts "
                  + ("no room for the store" if pred is None else f"{pred / GiB:.2f} GiB reserved"), flush=True)
        try:
            off = init_offloaded(cfg, a.batch, a.capacity, dtype, "nosa", slots)
            jax.block_until_ready(off.host_kv)
            phase("store arrays allocated")
        except Exception as e:  # noqa: BLE001 - the probe reports what XLA said
            phase("allocation failed")
            print(f"error: {type(e).__name__}: {str(e)[:600]}", flush=True)
        return 0
    phase("model built")
    gen = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots=slots, host_memory_budget=10 * host_b))
    prompts = [[(7 * i + j) % (cfg.vocab_size - 1) + 1 for j in range(a.prompt)] for i in range(a.batch)]
    st, logits, _ = gen.start(prompts, max_new_tokens=a.capacity - a.prompt, capacity=a.capacity)
    jax.block_until_ready(st.tokens)
    phase("start (store allocated, prefill moved to the host)")
    compiled = decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=gen.sampler, eos_ids=(),
                                 n_steps=a.steps).compile()
    print(f"memory analysis: {compiled.memory_analysis()}", flush=True)
    phase("decode loop compiled")
    if a.dump:
        large_allocations(a.dump, host_b)
    for i in range(2):
        t0 = time.perf_counter()
        st, logits = decode_loop(gen.graphdef, gen.state, st, logits, sampler=gen.sampler, eos_ids=(),
                                 n_steps=a.steps)
        jax.block_until_ready(st.tokens)
        phase(f"decode call {i + 1} ({time.perf_counter() - t0:.2f} s)")
    return 0


def large_allocations(dump: str, host_b: int) -> None:
    """The decode loop's allocations of at least a quarter of the store, with their first values."""
    for f in sorted(glob.glob(os.path.join(dump, "*decode_loop*buffer-assignment.txt"))):
        print(f"allocations of >= a quarter of the store ({host_b / 4 / GiB:.3f} GiB) in {os.path.basename(f)}:")
        lines = Path(f).read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"allocation (\d+): size (\d+)", line)
            if m and int(m.group(2)) >= host_b / 4:
                print("  " + line[:300])
                for value in lines[i + 1:i + 5]:
                    if value.lstrip().startswith("value:"):
                        print("    " + value.strip()[:300])


if __name__ == "__main__":
    sys.exit(main())
