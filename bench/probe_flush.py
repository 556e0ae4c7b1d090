"""GPU probe: what writing the decode loop's new blocks to the pinned host store costs, by layout.

`nosa_jax.offload.flush` writes, per sequence, F blocks of every layer and kv head from the pool
to the host store with one `dynamic_update_slice` of a `device_put(..., Host)` window. In the
store's layer-major layout [L, B, Hk, NB + F, 2, bs, D] that window is L * Hk strided pieces; in a
sequence-major layout [B, NB + F, L, Hk, 2, bs, D] it is one contiguous range, which XLA may be able
to write with a single device->host copy. Cases, each a jitted call with the store donated (median
wall time of REPEATS calls after a warm-up, and GB/s of the window bytes):
  layer-major, one write per sequence      (the flush today)
  sequence-major, one write per sequence   (contiguous windows)
  layer-major, one write for the batch     (only possible when every sequence's window starts at
                                            the same block; an upper bound)
  the same under lax.cond                  (whole batch when the windows align, else per sequence:
                                            the copies of the store in the compiled HLO are counted)
  device->host copy of the whole window    (the PCIe ceiling for these bytes)
Shapes: 8B / 16K / batch 16 with the 2-block window of a 32-step call and the 5-block window of a
full flush interval; 1B / batch 248 (a short store: its size does not change the write).

    python bench/probe_flush.py                  # GPU; summary in $OUT/probe_flush.txt when $OUT is set
    PROBE_SMALL=1 python bench/probe_flush.py    # CPU smoke test of this script
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from nosa_jax.offload import host_filled  # noqa: E402

BS, D = 64, 128
# (label, L, B, Hk, NB, F)
SHAPES = [("8b b16 16k call-end", 32, 16, 2, 256, 2), ("8b b16 16k interval", 32, 16, 2, 256, 5),
          ("1b b248 call-end", 28, 248, 2, 16, 2)]
if os.environ.get("PROBE_SMALL") == "1":
    BS, D = 8, 16
    SHAPES = [("small", 2, 3, 2, 6, 2)]
REPEATS = 7
LINES: list[str] = []
HOST = jax.memory.Space.Host


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_flush.txt").write_text("\n".join(LINES) + "\n")


def per_sequence(axis_b: int, axis_blk: int):
    """One dynamic_update_slice per sequence b of win[b] at block first[b] (B, block axes given)."""

    def write(store, win, first):
        z = jnp.zeros((), jnp.int32)
        for b in range(win.shape[axis_b]):
            part = jax.device_put(lax.slice_in_dim(win, b, b + 1, axis=axis_b), HOST)
            idx = [z] * store.ndim
            idx[axis_b], idx[axis_blk] = jnp.int32(b), first[b]
            store = lax.dynamic_update_slice(store, part, idx)
        return store
    return write


def whole_batch(store, win, first):
    z = jnp.zeros((), jnp.int32)
    return lax.dynamic_update_slice(store, jax.device_put(win, HOST), (z, z, z, first[0], z, z, z))


def whole_batch_when_aligned(store, win, first):
    """The whole-batch write under `lax.cond` when every window starts at the same block, else one
    write per sequence: does a conditional over the donated host store copy it?"""
    return lax.cond(jnp.all(first == first[0]), whole_batch, per_sequence(1, 3), store, win, first)


def store_copies(fn, store, win, first) -> str:
    """Copies of the store's shape in the compiled HLO, and the compiled temporaries (device, host)."""
    c = jax.jit(fn, donate_argnums=0).lower(store, win, first).compile()
    dims = ",".join(map(str, store.shape))
    n = sum(1 for line in c.as_text().splitlines() if f"[{dims}]" in line and (" copy(" in line or "copy-start(" in line))
    m = c.memory_analysis()
    host = getattr(m, "host_temp_size_in_bytes", 0)
    return f"{n} store copies, temporaries {m.temp_size_in_bytes / 2**20:.1f} MiB device, {host / 2**20:.1f} MiB host"


def timed(fn, store, win, first) -> float:
    f = jax.jit(fn, donate_argnums=0)
    store = f(store, win, first)
    jax.block_until_ready(store)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        store = f(store, win, first)
        jax.block_until_ready(store)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    log(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}")
    log("| shape | case | window MiB | ms per call | GB/s |")
    log("|---|---|---|---|---|")
    for label, L, B, Hk, NB, F in SHAPES:
        key = jax.random.key(0)
        layer_major = (L, B, Hk, F, 2, BS, D)
        win = jax.random.normal(key, layer_major, jnp.bfloat16)
        first = jnp.full((B,), NB // 2, jnp.int32)
        nbytes = win.size * win.dtype.itemsize
        cases = [
            ("layer-major, per sequence", (L, B, Hk, NB + F, 2, BS, D), win, per_sequence(1, 3)),
            ("sequence-major, per sequence", (B, NB + F, L, Hk, 2, BS, D), jnp.transpose(win, (1, 3, 0, 2, 4, 5, 6)),
             per_sequence(0, 1)),
            ("layer-major, whole batch", (L, B, Hk, NB + F, 2, BS, D), win, whole_batch),
            ("layer-major, whole batch under lax.cond", (L, B, Hk, NB + F, 2, BS, D), win, whole_batch_when_aligned),
        ]
        for name, shape, w, fn in cases:
            store = host_filled(shape, jnp.bfloat16, 0)
            try:
                copies = store_copies(fn, store, w, first)
                s = timed(fn, store, w, first)
                log(f"| {label} | {name} ({copies}) | {nbytes / 2**20:.1f} | {s * 1e3:.3f} | {nbytes / s / 1e9:.1f} |")
            except Exception as exc:  # noqa: BLE001
                log(f"| {label} | {name} | {nbytes / 2**20:.1f} | FAILED {type(exc).__name__}: {str(exc)[:160]} | |")
            del store
        s = timed(lambda _, w, __: jax.device_put(w, HOST), jnp.zeros(()), win, first)
        log(f"| {label} | device->host copy of the window | {nbytes / 2**20:.1f} | {s * 1e3:.3f} | "
            f"{nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
