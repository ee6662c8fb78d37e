"""Result rows → ``summary.json``, ``table.md`` and a bar chart.

A row is a dict with at least ``model``, ``bits`` ("W4A4", or "FP" for the float model), ``method`` ("fp",
"ptq", "ptq+qwt", "ptq+qwt*") and ``top1`` (percent); ``calib_seconds`` and ``size_mb`` are shown when present.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from .ptq.config import bit_tag

Row = dict[str, Any]
METHODS = ("fp", "ptq", "ptq+qwt", "ptq+qwt*")


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row], model: str) -> str:
    """One table per model: a line per bit width with FP, PTQ and PTQ+QwT top-1, the gain and timings."""
    mine = [r for r in rows if r["model"] == model]
    fp = next((r["top1"] for r in mine if r["method"] == "fp"), None)
    has_size = any("size_mb" in r for r in mine)
    has_star = any(r["method"] == "ptq+qwt*" for r in mine)
    head = "| bits | FP top-1 | PTQ top-1 | PTQ+QwT top-1 | Δ QwT | PTQ calib s | QwT calib s |"
    rule = "|---|---|---|---|---|---|---|"
    if has_star:
        head, rule = head + " PTQ+QwT* top-1 |", rule + "---|"
    if has_size:
        head, rule = head + " PTQ MB | PTQ+QwT MB |", rule + "---|---|"
    lines = [f"**{model}**", "", head, rule]
    for bits in dict.fromkeys(r["bits"] for r in mine if r["method"] != "fp"):
        ptq = next((r for r in mine if r["bits"] == bits and r["method"] == "ptq"), {})
        qwt = next((r for r in mine if r["bits"] == bits and r["method"] == "ptq+qwt"), {})
        gain = qwt["top1"] - ptq["top1"] if ptq and qwt else None
        cells = [bits, _fmt(fp), _fmt(ptq.get("top1")), _fmt(qwt.get("top1")),
                 "–" if gain is None else f"{gain:+.2f}", _fmt(ptq.get("calib_seconds"), 1),
                 _fmt(qwt.get("calib_seconds"), 1)]
        if has_star:
            star = next((r for r in mine if r["bits"] == bits and r["method"] == "ptq+qwt*"), {})
            cells.append(_fmt(star.get("top1")))
        if has_size:
            cells += [_fmt(ptq.get("size_mb"), 3), _fmt(qwt.get("size_mb"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: Sequence[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["bits"]) for r in rows if r["method"] != "fp"))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.38
    for k, (method, color) in enumerate((("ptq", "#9aa5b1"), ("ptq+qwt", "#2f7ed8"))):
        values = [next((r["top1"] for r in rows if (r["model"], r["bits"]) == g and r["method"] == method), 0.0)
                  for g in groups]
        xs = [i + (k - 0.5) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=method.upper().replace("+QWT", "+QwT"), color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for i, (model, _) in enumerate(groups):
        fp = next((r["top1"] for r in rows if r["model"] == model and r["method"] == "fp"), None)
        if fp is not None:
            ax.hlines(fp, i - width, i + width, colors="black", linestyles="dashed",
                      label="FP" if i == 0 else None)
    ax.set_xticks(range(len(groups)), [f"{m}\n{b}" for m, b in groups], fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 108)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A path to write ``path``'s new content to, in a new private folder beside it (so on the same file system).
    On success the file is flushed to disk and renamed over ``path``: a crash never leaves a half-written result
    and a reader sees the old file or the new one. On any failure or interrupt, ``path`` is left as it was. The
    folder, and whatever was written into it, is removed either way: a folder rather than a temporary file, so a
    writer that adds files beside its output (ONNX external data) adds them there, and two writers of one path
    never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = folder / path.name
        yield staged
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, path)
    finally:
        shutil.rmtree(folder)  # made by mkdtemp above: only this writer has written into it


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`staged_file`. The file gets the permissions a
    plain ``open`` would give it."""
    with staged_file(path) as staged:
        staged.write_bytes(data.encode() if isinstance(data, str) else data)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as :func:`atomic_write` saves text (the format follows ``path``'s suffix)."""
    with staged_file(path) as staged:
        fig.savefig(staged, dpi=120)


#: Flags that do not change a run's numbers (where it writes, how it loads, what it prints) or that name the run
#: itself (model, bit widths, weights file; stored as the record's ``run``): left out of the configuration hash.
_NOT_CONFIG = ("out", "workers", "no_progress", "skip_fp", "save", "model", "w_bits", "a_bits", "checkpoint")


def config_hash(args: Any) -> str:
    """A short hash of the flags that shape a run's numbers: runs of one table share it, and resume and
    assembly use it to tell a matching record from one made with other settings."""
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG}
    return hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes; computed once per path, size and modification time (a record is rewritten
    after every row)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def run_key(args: Any) -> dict[str, Any]:
    """What one record is a run of: model, bit label, smoke or not, and the weights file by path and by content
    (a file replaced under the same name is another run)."""
    checkpoint = args.checkpoint
    return {"model": args.model, "bits": bit_tag(args.w_bits, args.a_bits, args.conv_act_bits),
            "smoke": bool(args.smoke), "checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint)}


def write_run(out_dir: str | Path, stem: str, rows: Sequence[Row], details: dict[str, Any], args: Any,
              environment: dict[str, Any], complete: bool, data: dict[str, Any] | None = None) -> None:
    """One run's record, rewritten after every new row so a later crash loses nothing already computed.

    ``OUT/<stem>.json``: ``complete`` (false until the last row), ``config_hash``, ``run``, ``environment``,
    ``data`` (the image counts actually used) and ``rows``; ``OUT/details/<stem>.json``: per-block R²,
    configuration and the command-line ``args`` with paths as strings.
    """
    out = Path(out_dir)
    record = {"complete": complete, "config_hash": config_hash(args), "run": run_key(args),
              "environment": environment, "data": data or {}, "rows": list(rows)}
    details = {**details, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    atomic_write(out / "details" / f"{stem}.json", json.dumps(details, indent=2) + "\n")
    atomic_write(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")


def read_record(path: Path) -> dict[str, Any] | None:
    """A record file's content if it is a complete record, else None (partial, interrupted or foreign)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("complete") is not True or not isinstance(record.get("rows"), list):
        return None
    return record


def is_done(out_dir: Path, stem: str, args: Any) -> bool:
    """Whether ``OUT/<stem>.json`` is a complete record of exactly this run and configuration (resume)."""
    record = read_record(Path(out_dir) / f"{stem}.json")
    return record is not None and record.get("config_hash") == config_hash(args) and record.get("run") == run_key(args)


def resume_plan(out_dir: Path, flag_lists: Sequence[list[str]], parse: Callable[[list[str]], Any],
                stem: Callable[[Any], str]) -> tuple[list[tuple[list[str], Any]], list[str], str | None]:
    """Parse every run's flags up front (a bad flag fails before the first run) and drop the runs that already
    have a complete record of the same configuration. Returns the (flags, args) still to run, every run's record
    stem, and the table's configuration hash."""
    todo, stems, config = [], [], None
    for flags in flag_lists:
        args = parse(flags)
        stems.append(stem(args))
        config = config_hash(args)
        if is_done(out_dir, stems[-1], args):
            print(f"= {stems[-1]}: complete record with this configuration, skipped", flush=True)
        else:
            todo.append((flags, args))
    return todo, stems, config


def collect_records(folder: Path, expected: Sequence[str], config: str) -> tuple[list[Row], list[dict], list[str]]:
    """Rows of the complete records ``folder/<stem>.json`` for every stem in ``expected`` made with configuration
    hash ``config``; returns (rows, environments, missing stems). Other JSON in the folder is ignored."""
    rows: list[Row] = []
    environments: list[dict] = []
    missing: list[str] = []
    seen = set()
    for stem in expected:
        record = read_record(Path(folder) / f"{stem}.json")
        if record is None or record.get("config_hash") != config:
            missing.append(stem)
            continue
        if record.get("environment") not in environments:
            environments.append(record.get("environment"))
        for row in record["rows"]:
            key = (row["model"], row["bits"], row["method"])
            if key not in seen:  # the FP row is evaluated once per model
                seen.add(key)
                rows.append(row)
    return rows, environments, missing


def write_report(rows: Sequence[Row], out_dir: str | Path, title: str, meta: dict[str, Any]) -> str:
    """Write summary.json (``meta``, e.g. the environment, plus ``rows``), table.md and chart.png into
    ``out_dir``; returns the markdown."""
    for r in rows:
        missing = {"model", "bits", "method", "top1"} - set(r)
        if missing or r["method"] not in METHODS:
            raise ValueError(f"malformed result row {r}: needs model/bits/method/top1, method in {METHODS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    markdown = f"## {title}\n\n" + "\n\n".join(markdown_table(rows, m) for m in models) + "\n"
    atomic_write(out / "summary.json", json.dumps({**meta, "rows": list(rows)}, indent=2) + "\n")
    atomic_write(out / "table.md", markdown)
    bar_chart(rows, out / "chart.png", title)
    return markdown
