"""Collect a task's per-run records into one table next to the paper's numbers.

    python scripts/assemble_table.py QwT-cls-RepQ-ViT results/cls_vit [--config-hash H]

writes RESULTS/summary.json, RESULTS/table.md and (top-1 tables) RESULTS/chart.png. Only complete records made
with one configuration are read (--config-hash, or the only one present); partial or damaged records, records of
other settings and any other JSON in the folder are ignored and reported. The table's runs that have no such
record are listed as missing and the exit status is then 1; records of models that are not in the task's table
are refused (exit status 2).
"""
import argparse
import sys
from pathlib import Path

from qwt.cli import run_cli
from qwt.tasks.tables import assemble_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", type=Path, help="task folder, e.g. QwT-cls-RepQ-ViT (its configs/table.json)")
    p.add_argument("results", type=Path, help="folder with <model>_<bits>.json run records")
    p.add_argument("--config-hash", help="assemble the records of this configuration (see any record)")
    args = p.parse_args(argv)
    return run_cli(assemble_folder, args.task, args.results, args.config_hash)


if __name__ == "__main__":
    sys.exit(main())
