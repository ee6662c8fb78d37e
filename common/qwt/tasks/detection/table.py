"""The detection table: our box / mask AP next to the published numbers (``configs/paper.json``)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...report import atomic_write, collect_records

Row = dict[str, Any]
METHODS = ("fp", "ptq", "ptq+qwt")
_LABELS = {"fp": "FP", "ptq": "RepQ-ViT", "ptq+qwt": "RepQ-ViT+QwT"}


def _published(paper: dict[str, Any], row: Row) -> dict[str, float] | None:
    entry = paper["models"].get(row["model"], {})
    return entry.get("fp") if row["method"] == "fp" else entry.get(row["bits"], {}).get(row["method"])


def _cell(ours: float, published: float | None) -> str:
    if published is None:
        return f"{ours:.1f} | –"
    return f"{ours:.1f} | {published:.1f} ({ours - published:+.1f})"


def markdown(rows: Sequence[Row], paper: dict[str, Any]) -> str:
    """One line per (model, bits, method): box AP and mask AP, ours | paper (difference), and calibration time."""
    lines = ["| model | bits | method | box AP | paper box AP | mask AP | paper mask AP | calib s |",
             "|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"] != "FP", r["bits"], order[r["method"]])):
        published = _published(paper, r) or {}
        lines.append(f"| {r['model']} | {r['bits']} | {_LABELS[r['method']]} | "
                     f"{_cell(r['box_ap'], published.get('box'))} | {_cell(r['mask_ap'], published.get('mask'))} | "
                     f"{r['calib_seconds']:.1f} |")
    return "\n".join(lines) + f"\n\nPaper numbers: {paper['source']}\n"


def write_table(folder: Path, stems: Sequence[str], config: str, paper_path: Path,
                title: str) -> tuple[str, list[str]]:
    """Collect the complete records ``folder/<stem>.json`` made with configuration hash ``config`` into
    ``summary.json`` and ``table.md``; returns the markdown and the stems that have no such record."""
    rows, environments, missing = collect_records(folder, stems, config)
    for r in rows:
        absent = {"model", "bits", "method", "box_ap", "mask_ap", "calib_seconds"} - set(r)
        if absent or r["method"] not in METHODS:
            raise ValueError(f"malformed detection row {r}: missing {sorted(absent)} or method not in {METHODS}")
    text = f"## {title}\n\n" + markdown(rows, json.loads(Path(paper_path).read_text()))
    if missing:
        text += f"\nMissing runs (no complete record with configuration {config}): {', '.join(missing)}\n"
    summary = {"config_hash": config, "environment": environments, "missing": missing, "rows": rows}
    atomic_write(Path(folder) / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(Path(folder) / "table.md", text)
    return text, missing
