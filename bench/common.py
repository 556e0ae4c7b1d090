"""Shared helpers for the GPU benchmarks: device timing, result records, tables."""

from __future__ import annotations

import datetime
import gzip
import importlib
import json
import re
import tempfile
import os
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


# kernel choices a benchmark may switch per run: key -> (module, attribute, values); each attribute
# is read at trace time. "write" is the on-device cache's decode write, "append" the offloaded
# cache's (nosa_jax.offload._append). "slots" and "loads" are the offloaded cache's slot assignment
# and whether the misses are read inside the attention kernel ("fused"); "rows" whether the slot kernel
# also finds the new token's pool rows. "pool": whether the Pallas
# top-k pools and forces its decode inputs in its own kernel.
KERNEL_CHOICES = {"topk": ("pallas_kernels.selection", "TOPK_IMPL", ("xla", "pallas")),
                  "search": ("pallas_kernels.topk", "RADIX_SEARCH", ("early", "full")),
                  "finish": ("pallas_kernels.selection", "SCORES_FINISH", ("jnp", "pallas")),
                  "pool": ("pallas_kernels.selection", "TOPK_POOL", ("kernel", "xla")),
                  "write": ("pallas_kernels.cache_write", "WRITE_IMPL", ("xla", "pallas")),
                  "append": ("pallas_kernels.cache_write", "APPEND_IMPL", ("xla", "pallas")),
                  "slots": ("pallas_kernels.slots", "SLOTS_IMPL", ("xla", "pallas")),
                  "rows": ("pallas_kernels.slots", "ROWS", ("kernel", "xla")),
                  "slots_warps": ("pallas_kernels.slots", "WARPS", ("auto", "4", "8", "16")),
                  "loads": ("nosa_jax.offload", "LOADS", ("fused", "separate"))}
KERNEL_CHOICES_HELP = ", ".join(f"{k} {'|'.join(v)}" for k, (_, _, v) in KERNEL_CHOICES.items())


def add_layer_unroll_arg(ap) -> None:
    ap.add_argument("--layer-unroll", type=int, default=None,
                    help="unroll of the scan over layers (0: a straight-line program; default: the model's "
                         "'auto', straight-line for a decode step whose cache is updated in place: the offloaded "
                         "cache, or the on-device one with the Pallas cache write)")


def layer_unroll(args):
    """The model's layer_unroll for --layer-unroll (None: "auto"; 0: a straight-line program)."""
    return "auto" if args.layer_unroll is None else (args.layer_unroll or True)


def parse_kernels(text: str) -> dict:
    """"default" or "key=value,..." over KERNEL_CHOICES (e.g. "write=pallas,finish=pallas"). Keys
    that start with "xla_" are XLA options for the decode program instead (`xla_option_value`),
    returned under "xla"; only `throughput.py --ab` compiles with them."""
    if text == "default":
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.startswith("xla_") and value:
            out.setdefault("xla", {})[key] = xla_option_value(value)
            continue
        if key not in KERNEL_CHOICES or value not in KERNEL_CHOICES[key][2]:
            raise SystemExit(f"kernel choice {text!r}: expected 'default' or key=value pairs from "
                             f"{KERNEL_CHOICES_HELP}, or xla_*=value XLA options")
        out[key] = value
    return out


def kernel_choices(overrides: dict | None = None) -> dict:
    """The modules' current kernel choices, with `overrides` set on the modules first. The choices
    are read at trace time and are not part of jit's cache keys: when one changes, every cached
    trace is dropped, so the next call traces with the new choices."""
    def current():
        return {k: getattr(importlib.import_module(mod), attr)
                for k, (mod, attr, _) in KERNEL_CHOICES.items()}

    before = current()
    for key, value in (overrides or {}).items():
        if key == "xla":  # XLA options (parse_kernels): not a module choice
            continue
        mod, attr, _ = KERNEL_CHOICES[key]
        setattr(importlib.import_module(mod), attr, value)
    after = current()
    if after != before:
        jax.clear_caches()
    return after


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def record(name: str, settings: dict, metric: str, value: float, unit: str) -> dict:
    return {"name": name, "settings": settings, "metric": metric, "value": float(value), "unit": unit,
            "device": device_name(), "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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


def xla_option_value(v: str):
    """An XLA option's value from the command line: bools and ints as such, anything else a string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


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


def device_events(trace_path: Path) -> list[tuple[str, float, float, dict]]:
    """(name, start_us, dur_us, args) of every complete event on a device (GPU stream) track of a
    perfetto trace written by `jax.profiler.trace(..., create_perfetto_trace=True)`."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {p for p, n in procs.items() if "/device:" in n and "host" not in n.lower()}
    return [(e["name"], float(e["ts"]), float(e.get("dur", 0)), e.get("args", {})) for e in events
            if e.get("ph") == "X" and e.get("pid") in dev_pids]


def trace_device_events(fn):
    """Run fn() under the JAX profiler; returns (fn's result, device events of the run)."""
    logdir = Path(tempfile.mkdtemp(prefix="nosa-prof-"))
    with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
        out = fn()
    traces = sorted(logdir.rglob("perfetto_trace.json.gz")) or sorted(logdir.rglob("*.trace.json.gz"))
    return out, (device_events(traces[-1]) if traces else [])


def busy_time(events) -> float:
    """Length of the union of the events' intervals (us)."""
    total, end = 0.0, -1e30
    for e in sorted(events, key=lambda e: e[1]):
        s, d = e[1], e[2]
        if s > end:
            total += d
            end = s + d
        elif s + d > end:
            total += s + d - end
            end = s + d
    return total


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Kernel name (HLO instruction name with '.' -> '_', as the GPU trace names kernels) -> the
    op_name metadata of that instruction (the jax call path, named scopes included)."""
    out = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
        out[m.group(1).replace(".", "_").replace("-", "_")] = m.group(2)
    return out


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist compiled programs, so compiling the same program twice (e.g. to read its HLO after
    running it) costs a cache hit. Only on a GPU: the time split it serves needs device traces, and
    a CPU run (the benchmarks' tests) must not change the process's compilation settings."""
    if jax.devices()[0].platform != "gpu":
        return
    jax.config.update("jax_compilation_cache_dir", path or tempfile.mkdtemp(prefix="nosa-jaxcache-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def split_by_scope(events, scopes: dict[str, tuple[str, ...]], op_names: dict[str, str] | None = None) -> dict[str, float]:
    """Sum device time (us) by category: an event belongs to the first category one of whose
    markers appears in its kernel name, its args, or (with `op_names` from `hlo_op_names`) the
    op_name of the HLO instruction it ran (named scopes reach it there); else "rest"."""
    out = {k: 0.0 for k in scopes} | {"rest": 0.0}
    op_names = op_names or {}
    for name, _, d, args in events:
        text = name + " " + op_names.get(name, "") + " " + " ".join(str(v) for v in args.values())
        for k, markers in scopes.items():
            if any(m in text for m in markers):
                out[k] += d
                break
        else:
            out["rest"] += d
    return out


def device_memory_line(label: str) -> str:
    """One line of the device allocator's numbers (GiB in use, peak, limit, largest allocation),
    for finding what holds device memory between a benchmark's steps; '' where the backend keeps
    no such statistics (the CPU)."""
    d = jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if not stats or "bytes_in_use" not in stats:
        return ""
    g = lambda k: stats.get(k, 0) / 2**30  # noqa: E731
    return (f"  memory {label}: in use {g('bytes_in_use'):.2f} GiB, peak {g('peak_bytes_in_use'):.2f}, "
            f"limit {g('bytes_limit'):.2f}, largest allocation {g('largest_alloc_size'):.2f}")


def compiled_memory_line(compiled, label: str) -> str:
    """One line of a compiled program's memory analysis (GiB of arguments, outputs, aliased bytes
    and temporaries on the device), for finding what a program asks for beyond its inputs."""
    ma = compiled.memory_analysis()
    if ma is None:
        return ""
    g = lambda k: getattr(ma, k, 0) / 2**30  # noqa: E731
    return (f"  compiled {label}: arguments {g('argument_size_in_bytes'):.2f} GiB, outputs "
            f"{g('output_size_in_bytes'):.2f}, aliased {g('alias_size_in_bytes'):.2f}, temporaries "
            f"{g('temp_size_in_bytes'):.2f}; host arguments {g('host_argument_size_in_bytes'):.2f}, "
            f"host temporaries {g('host_temp_size_in_bytes'):.2f}")
