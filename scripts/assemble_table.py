"""Collect a task's per-run result files into one table next to the paper's numbers.

    python scripts/assemble_table.py results/cls_vit QwT-cls-RepQ-ViT/configs/paper.json
writes RESULTS/summary.json, RESULTS/table.md (ours, per model), RESULTS/vs_paper.md and RESULTS/chart.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwt.report import atomic_write, paper_comparison, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="folder with <model>_<bits>.json row files")
    p.add_argument("paper", type=Path, help="published numbers (json)")
    p.add_argument("--title", default="QwT results")
    args = p.parse_args(argv)
    files = sorted(f for f in args.results.glob("*.json") if f.name != "summary.json")
    if not files:
        print(f"error: no result files in {args.results}", file=sys.stderr)
        return 2
    rows, seen = [], set()
    for f in files:
        for row in json.loads(f.read_text()):
            key = (row["model"], row["bits"], row["method"])
            if key not in seen:  # the FP row repeats in every run of a model
                seen.add(key)
                rows.append(row)
    write_report(rows, args.results, args.title)
    comparison = paper_comparison(rows, json.loads(args.paper.read_text()))
    atomic_write(args.results / "vs_paper.md", comparison)
    print(comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())
