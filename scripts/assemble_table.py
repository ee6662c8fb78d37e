"""Collect a task's per-run records into one table next to the paper's numbers.

    python scripts/assemble_table.py results/cls_vit QwT-cls-RepQ-ViT/configs/paper.json [--config-hash H]
writes RESULTS/summary.json, RESULTS/table.md (ours, per model), RESULTS/vs_paper.md and RESULTS/chart.png.
Only complete records made with one configuration are read (``--config-hash``, or the only one present);
partial records, records of other settings and any other JSON in the folder are ignored and reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from qwt.cli import run_cli
from qwt.errors import InputError
from qwt.report import atomic_write, collect_records, paper_comparison, read_record, write_report


def assemble(folder: Path, stems: Sequence[str], config: str, paper: Path, title: str) -> int:
    """Write the table from the complete records ``folder/<stem>.json`` made with configuration ``config``;
    returns 1 (after writing what exists) when some runs are missing, else 0."""
    rows, environments, missing = collect_records(folder, stems, config)
    if not rows:
        raise InputError(f"no complete record with configuration {config} in {folder}")
    write_report(rows, folder, title, {"config_hash": config, "environment": environments, "missing": missing})
    comparison = paper_comparison(rows, json.loads(paper.read_text()))
    atomic_write(folder / "vs_paper.md", comparison)
    print(comparison)
    if missing:
        print(f"missing runs (no complete record with configuration {config}): {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


def _main(args: argparse.Namespace) -> int:
    records = {f.stem: read_record(f) for f in sorted(args.results.glob("*.json")) if f.name != "summary.json"}
    complete = {stem: r for stem, r in records.items() if r is not None}
    hashes = Counter(r.get("config_hash") for r in complete.values())
    if args.config_hash is None:
        if len(hashes) != 1:
            found = ", ".join(f"{h} ({n} runs)" for h, n in hashes.items()) or "none"
            raise InputError(f"{args.results}: complete records of one configuration expected, found {found}; "
                             "pass --config-hash")
        args.config_hash = next(iter(hashes))
    ignored = sorted(stem for stem in records if stem not in complete)
    if ignored:
        print(f"ignored (incomplete or not a run record): {', '.join(ignored)}", file=sys.stderr)
    stems = [stem for stem, r in complete.items() if r.get("config_hash") == args.config_hash]
    return assemble(args.results, stems, args.config_hash, args.paper, args.title)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="folder with <model>_<bits>.json run records")
    p.add_argument("paper", type=Path, help="published numbers (json)")
    p.add_argument("--title", default="QwT results")
    p.add_argument("--config-hash", help="assemble the records of this configuration (see any record)")
    return run_cli(_main, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
