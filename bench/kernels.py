"""Kernel benchmarks on the GPU: block-sparse decode attention, the decode selection path and
block-sparse prefill attention, each against its baselines in the same run.

    python bench/kernels.py [--only decode selection prefill] [--quick]

Writes bench/results/kernels-<date>.json (records {name, settings, metric, value, unit, device,
jax_version, date}) and a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, save  # noqa: E402

PARTS = ("decode", "selection", "prefill")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    records, tables = [], []
    for part in args.only:
        mod = importlib.import_module(f"bench.kernels_{part}")
        try:
            rows = mod.run(records, quick=args.quick)
        except Exception:  # keep the other parts' numbers
            traceback.print_exc()
            continue
        tables.append(f"### {part}\n\n" + markdown_table(mod.HEADER, rows))
    table = "\n".join(tables)
    print(table)
    print("wrote", save(records, "kernels", table))


if __name__ == "__main__":
    main()
