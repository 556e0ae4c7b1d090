"""GPU probe: can a host->device block load run beside weight-bound GEMMs inside one jitted step?

The offloaded decode step's serial floor (weights + selected KV at 4.3 TB/s, then the misses at
53 GB/s) is 5.76 ms at 8B / 16K / batch 16; with the misses' PCIe reads overlapped with the HBM
work it would be max(4.23, 1.53) ms. That needs a load that runs while the GEMMs run. This probe
measures whether that happens, with no model around it:

  gemm      a chain of N_W [16, 4096] x [4096, 4096] bf16 products (N_W separate weights,
            32 MiB each, read once per call; products this short are partly launch-bound, ~1.4
            TB/s on an H100, but the chain keeps the GPU busy for ~1.7-2 ms)
  load      kv_loader.load_blocks(path="pallas"): M_LOAD host blocks of 32 KB per (b, h)
            (K and V of 64 tokens x 128) read in place from a pinned_host store into a donated
            device pool (the offloaded step's miss load)
  serial    both in one jit, no annotation (XLA: one compute stream)
  stream1   both in one jit, the load under compute_on("gpu_stream:1")
  stream1k  the same with the bare Triton call on stream 1 (no jit or reshape around it)
  stream1g  the GEMM chain beside a second GEMM chain of N_W // 4 products on stream 1 (is any
            computation placed on a second stream in this jax / XLA?)
  xla       kv_loader.load_blocks(path="xla") of M_XLA blocks per (b, h) (one dynamic_slice +
            device_put per block: XLA's own host->device copies, unrolled), alone and beside the GEMMs
  dma       the GEMMs beside jax.device_put of one contiguous host slice of the same bytes
            (XLA's copy engine path; the bytes land in a fresh device array)
Each row: median wall time per call over REPS calls after warm-up, and for the pairs the overlap
ratio (sum of the two alone - pair) / min of the two alone: 1 = fully hidden, 0 = serial.
The load's result is checked against the load alone (bit-exact) in every pair.

Measured (H100, session 26, bench/results/probe_streams-s26-h100.log): only the contiguous copy
overlaps (1.0-1.2); the in-place load is serial on one stream and on stream 1 (0.1-0.3; "stream1"
does not compile: no ExecutionStreamId for its call-start), and the per-block XLA copies run at
7 GB/s without overlap (0.13).

    python bench/probe_streams.py        # GPU (about 1 minute); summary in $OUT/probe_streams.txt
    PROBE_SMALL=1 python bench/probe_streams.py   # CPU smoke test (interpret mode, tiny shapes)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.compute_on import compute_on  # noqa: E402

from bench.common import markdown_table, record, save  # noqa: E402
from pallas_kernels.kv_loader import _load_pallas, load_blocks  # noqa: E402

SMALL = os.environ.get("PROBE_SMALL") == "1"
B, HK, NB, BS, D, S, M_LOAD = (2, 2, 8, 16, 16, 6, 3) if SMALL else (16, 2, 256, 64, 128, 64, 48)
M_XLA = min(8, M_LOAD)  # blocks per (b, h) of the xla path's case
HID, N_W = (64, 3) if SMALL else (4096, 80)
REPS = 3 if SMALL else 15
INTERPRET = jax.default_backend() != "gpu"
LINES: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_streams.txt").write_text("\n".join(LINES) + "\n")


def gemms(x, ws):
    for w in ws:  # each product's output feeds the next: a chain, as the layers' GEMMs are
        x = (x @ w).astype(x.dtype)
    return x


def load(host_kv, cis, pools, blocks, slots):
    return load_blocks(host_kv, cis, *pools, 0, blocks, slots, block_size=BS, path="pallas",
                       interpret=INTERPRET)


def load_bare(host_kv, cis, pools, layer_arr, blocks, slots):
    return _load_pallas(host_kv, cis, *pools, layer_arr, blocks, slots, None, block_size=BS,
                        interpret=INTERPRET, num_warps=4)


def on_stream1(fn, n_out: int | None = 3):
    """fn on the second stream; n_out outputs (None: a single array)."""
    space = jax.memory.Space.Device
    spaces = space if n_out is None else (space,) * n_out
    return compute_on(compute_type="gpu_stream:1", out_memory_spaces=spaces)(fn)


def timed(fn, args_of):
    """Median wall seconds per call; `args_of(prev_out)` gives the next call's arguments (pools are
    donated, so each call takes the previous call's pools)."""
    out = None
    for _ in range(3):
        out = fn(*args_of(out))
        jax.block_until_ready(out)
    times = []
    for _ in range(REPS):
        args = args_of(out)
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    dev = jax.devices()[0]
    log(f"device {dev.device_kind}  jax {jax.__version__}  small={SMALL}")
    rng = np.random.default_rng(0)
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    kv_np = rng.standard_normal((1, B, HK, NB, 2, BS, D), dtype=np.float32).astype(jnp.bfloat16)
    host_kv = jax.device_put(kv_np, host)
    cis = jnp.asarray(rng.standard_normal((1, B, NB * BS, HK)), jnp.float32)
    blocks = jnp.asarray(np.stack([[rng.choice(NB, M_LOAD, replace=False) for _ in range(HK)]
                                   for _ in range(B)]), jnp.int32)
    slots = jnp.asarray(np.stack([[rng.choice(S, M_LOAD, replace=False) for _ in range(HK)]
                                  for _ in range(B)]), jnp.int32)
    load_bytes = B * HK * M_LOAD * 2 * BS * D * 2
    x = jnp.asarray(rng.standard_normal((16, HID)) * 0.01, jnp.bfloat16)
    ws = [jnp.asarray(rng.standard_normal((HID, HID)) / np.sqrt(HID), jnp.bfloat16) for _ in range(N_W)]
    flat_host = jax.device_put(kv_np.reshape(-1)[: load_bytes // 2], host)
    log(f"load {load_bytes / 2**20:.1f} MiB ({B * HK * M_LOAD} blocks of {2 * BS * D * 2 // 1024} KiB); "
        f"gemm chain {N_W} x {HID * HID * 2 / 2**20:.0f} MiB weights")

    def fresh_pools():
        return (jnp.zeros((1, B, S * BS, HK, D), jnp.bfloat16), jnp.zeros((1, B, S * BS, HK, D), jnp.bfloat16),
                jnp.zeros((1, B, S * BS, HK), jnp.float32))

    f_gemm = jax.jit(gemms)
    f_load = jax.jit(load, donate_argnums=(2,))
    f_serial = jax.jit(lambda x, ws, h, c, p, b, s: (gemms(x, ws), load(h, c, p, b, s)), donate_argnums=(4,))
    f_stream = jax.jit(lambda x, ws, h, c, p, b, s: (gemms(x, ws), on_stream1(load)(h, c, p, b, s)),
                       donate_argnums=(4,))
    layer_arr = jnp.zeros((1,), jnp.int32)
    bx, sx = blocks[:, :, :M_XLA], slots[:, :, :M_XLA]
    xla_bytes = B * HK * M_XLA * 2 * BS * D * 2
    xla_load = lambda h, c, p: load_blocks(h, c, *p, 0, bx, sx, block_size=BS, path="xla")  # noqa: E731
    f_xla = jax.jit(xla_load, donate_argnums=(2,))
    f_xla_pair = jax.jit(lambda x, ws, h, c, p: (gemms(x, ws), xla_load(h, c, p)), donate_argnums=(4,))
    f_stream_k = jax.jit(lambda x, ws, h, c, p, b, s: (gemms(x, ws), on_stream1(load_bare)(h, c, p, layer_arr, b, s)),
                         donate_argnums=(4,))
    f_stream_g = jax.jit(lambda x, ws: (gemms(x, ws), on_stream1(gemms, None)(x, ws[: N_W // 4])))
    f_dma = jax.jit(lambda x, ws, h: (gemms(x, ws), jax.device_put(h, jax.memory.Space.Device)))
    f_dma_alone = jax.jit(lambda h: jax.device_put(h, jax.memory.Space.Device))

    def pools_of(out, pair):
        if out is None:
            return fresh_pools()
        return out[1] if pair else out

    res: dict[str, float] = {}
    ref_pools = None
    cases = [
        ("gemm", lambda: timed(f_gemm, lambda o: (x, ws))),
        ("load", lambda: timed(f_load, lambda o: (host_kv, cis, pools_of(o, False), blocks, slots))),
        ("dma alone", lambda: timed(f_dma_alone, lambda o: (flat_host,))),
        ("serial", lambda: timed(f_serial, lambda o: (x, ws, host_kv, cis, pools_of(o, True), blocks, slots))),
        ("stream1", lambda: timed(f_stream, lambda o: (x, ws, host_kv, cis, pools_of(o, True), blocks, slots))),
        ("stream1k", lambda: timed(f_stream_k, lambda o: (x, ws, host_kv, cis, pools_of(o, True), blocks, slots))),
        ("stream1g", lambda: timed(f_stream_g, lambda o: (x, ws))),
        ("xla alone", lambda: timed(f_xla, lambda o: (host_kv, cis, pools_of(o, False)))),
        ("xla", lambda: timed(f_xla_pair, lambda o: (x, ws, host_kv, cis, pools_of(o, True)))),
        ("dma", lambda: timed(f_dma, lambda o: (x, ws, flat_host))),
    ]
    for name, run in cases:
        try:
            t, out = run()
        except Exception as e:  # a case that cannot compile or run says why; the others go on
            log(f"{name:10s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if os.environ.get("PROBE_TRACE"):
                traceback.print_exc()
            continue
        res[name] = t
        check = ""
        if name == "load":
            ref_pools = [np.asarray(a) for a in out]
        elif name in ("serial", "stream1", "stream1k") and ref_pools is not None:
            same = all(np.array_equal(np.asarray(a), r) for a, r in zip(out[1], ref_pools))
            check = "  load bit-exact" if same else "  LOAD DIFFERS from the load alone"
        gbs = {"load": load_bytes, "dma alone": load_bytes, "xla alone": xla_bytes}.get(name)
        gbs = f"  {gbs / t / 1e9:6.1f} GB/s" if gbs else ""
        log(f"{name:10s} {t * 1e6:9.1f} us{gbs}{check}")
    settings = {"B": B, "Hk": HK, "block_size": BS, "head_dim": D, "load_blocks": B * HK * M_LOAD,
                "xla_blocks": B * HK * M_XLA, "gemm_weights": N_W, "hidden": HID, "reps": REPS,
                "xla_flags": os.environ.get("XLA_FLAGS", "")}
    records = [record(f"probe_streams/{k}", settings, "wall_time_median", v * 1e6, "us") for k, v in res.items()]
    rows = [[k, f"{v * 1e6:.1f}", ""] for k, v in res.items()]
    for pair, side in (("serial", "load"), ("stream1", "load"), ("stream1k", "load"), ("xla", "xla alone"), ("dma", "dma alone")):
        if pair in res and "gemm" in res and side in res:
            a, b, p = res["gemm"], res[side], res[pair]
            records.append(record(f"probe_streams/{pair}", settings, "overlap", (a + b - p) / min(a, b), "ratio"))
            rows.append([f"{pair} overlap", "", f"{(a + b - p) / min(a, b):+.2f}"])
            log(f"{pair:10s} vs gemm + {side}: sum {(a + b) * 1e6:.1f} us, max {max(a, b) * 1e6:.1f} us, "
                f"pair {p * 1e6:.1f} us, overlap {(a + b - p) / min(a, b):+.2f}")
    log(f"saved {save(records, 'probe_streams', markdown_table(['case', 'median us', 'overlap'], rows))}")


if __name__ == "__main__":
    main()
