"""Shared helpers for the GPU benchmarks: device timing, result records, tables."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def record(name: str, settings: dict, metric: str, value: float, unit: str) -> dict:
    return {"name": name, "settings": settings, "metric": metric, "value": float(value), "unit": unit,
            "device": device_name(), "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def time_fn(fn, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` (which must block until its device work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def save(records: list[dict], stem: str, table: str) -> Path:
    """Write records to bench/results/<stem>-<date>.json (and $OUT when set) plus a Markdown table."""
    day = datetime.date.today().isoformat()
    # committed results are GPU numbers: a CPU run (a smoke test of the script) goes to /tmp
    paths = [RESULTS if jax.devices()[0].platform == "gpu" else Path("/tmp/nosa-bench")]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]))
    for d in paths:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{stem}-{day}.json").write_text(json.dumps(records, indent=1))
        (d / f"{stem}-{day}.md").write_text(table)
    return paths[0] / f"{stem}-{day}.json"


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def standalone(run, header: list[str], stem: str, *, sweep_help: str | None = None) -> None:
    """The `python bench/kernels_X.py` entry point shared by the kernel benchmark modules."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    if sweep_help:
        ap.add_argument("--sweep", action="store_true", help=sweep_help)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0]}  jax {jax.__version__}", flush=True)
    records: list = []
    rows = run(records, quick=args.quick, **({"sweep": args.sweep} if sweep_help else {}))
    table = markdown_table(header, rows)
    print(table)
    print(f"saved {save(records, stem, table)}")
