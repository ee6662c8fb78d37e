"""Result rows → markdown tables and bar charts; atomic writes; run records read back for resume and assembly.

A row (:mod:`qwt.tasks.protocol` writes them) is a dict with ``model``, ``bits`` ("W4A4", or "FP" for the float
model), ``baseline`` (None on the FP row) and ``baseline_options``, ``stage`` ("fp", "ptq", "qwt", "qwt*"),
``form`` (a QwT row's compensation form), the task's metrics, and ``ptq_seconds``, ``qwt_seconds``, ``size_mb``,
``peak_memory_mb``, ``blocks_kept``/``blocks`` where they apply.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Column:
    """A metric column of a task's table: its key in the rows, its label, its digits, and which way is better.
    ``interval``: rows may carry ``<key>_interval`` = [low, high], a 95 % interval shown beside the value."""

    key: str
    label: str
    digits: int = 2
    lower_is_better: bool = False
    interval: bool = False

    @property
    def header(self) -> str:
        return self.label + (" [95 %]" if self.interval else "")

    def cell(self, row: Row) -> str:
        """The value, and its interval where the row has one: ``38.72 [37.95, 39.51]``."""
        text = _fmt(row.get(self.key), self.digits)
        bounds = row.get(f"{self.key}_interval") if self.interval else None
        return text + (f" [{_fmt(bounds[0], self.digits)}, {_fmt(bounds[1], self.digits)}]" if bounds else "")


#: How each stage reads in tables and charts.
STAGES = {"fp": "FP", "ptq": "PTQ", "qwt": "PTQ + QwT", "qwt*": "PTQ + QwT*"}


def form_label(form: str | None) -> str:
    """How a QwT form reads after "QwT": nothing for the dense map (the paper's), " channel-wise", " rank64"."""
    return "" if form in (None, "dense") else " channel-wise" if form == "channelwise" else f" {form}"


def stage_label(row: Row) -> str:
    """``PTQ + QwT``, ``PTQ + QwT channel-wise``, ``PTQ + QwT rank64``, ..."""
    return STAGES[row["stage"]] + form_label(row.get("form"))


def baseline_label(row: Row) -> str:
    """``gptq`` or ``gptq (act_order=true, group_size=128)``; empty for the FP row."""
    options = row.get("baseline_options") or {}
    given = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(options.items()))
    return (row.get("baseline") or "") + (f" ({given})" if given else "")


def _setting(row: Row) -> tuple[str, str, str]:
    return row["model"], row["bits"], baseline_label(row)


def _gap(row: Row, rows: Sequence[Row], column: Column) -> tuple[str, str]:
    """(Δ against the same setting's PTQ row, the share of the PTQ row's distance to FP that the row closes)."""
    if row["stage"] not in ("qwt", "qwt*"):
        return "–", "–"
    ptq = next((r for r in rows if r["stage"] == "ptq" and _setting(r) == _setting(row)), None)
    fp = next((r for r in rows if r["stage"] == "fp" and r["model"] == row["model"]), None)
    if ptq is None or row.get(column.key) is None or ptq.get(column.key) is None:
        return "–", "–"
    delta = row[column.key] - ptq[column.key]
    closed = "–"
    if fp is not None and fp.get(column.key) is not None and fp[column.key] != ptq[column.key]:
        closed = f"{100 * delta / (fp[column.key] - ptq[column.key]):.0f} %"
    return f"{delta:+.{column.digits}f}", closed


def _kept(row: Row) -> str:
    if "blocks" not in row:
        return "–"
    kept = f"{row['blocks_kept']}/{row['blocks']}"
    guard = row.get("output_guard")
    if guard and guard["depth"] < row["blocks"]:
        kept += f" (model guard: first {guard['depth']})"
    return kept


def results_table(rows: Sequence[Row], columns: Sequence[Column], title: str, record: dict[str, Any]) -> str:
    """Markdown: a table per model, a line per row (bits, baseline, stage, the metrics, Δ and gap closed on the
    first metric, blocks kept, seconds, peak memory, size), under the title and the machine it ran on."""
    head = columns[0]
    env = record.get("environment") or {}
    machine = ", ".join(f"{k} {env[k]}" for k in ("cpu_capability", "torch", "threads", "device") if k in env)
    peak = "peak MB" + ("" if record.get("peak_memory", "per row") == "per row" else " (running max)")
    lines = [f"## {title}", "", f"Machine: {machine}." if machine else "", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"**{model}**", "",
                  "| bits | baseline | stage | " + " | ".join(c.header for c in columns)
                  + f" | Δ {head.label} | gap closed | blocks kept | PTQ s | QwT s | {peak} | size MB |",
                  "|" + "---|" * (len(columns) + 10)]
        for r in (r for r in rows if r["model"] == model):
            delta, closed = _gap(r, rows, head)
            cells = [r["bits"], baseline_label(r) or "–", stage_label(r),
                     *(c.cell(r) for c in columns), delta, closed, _kept(r),
                     _fmt(r.get("ptq_seconds"), 1), _fmt(r.get("qwt_seconds"), 1),
                     _fmt(r.get("peak_memory_mb"), 0), _fmt(r.get("size_mb"), 3)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def results_chart(rows: Sequence[Row], column: Column, path: Path, title: str) -> None:
    """Bars of ``column`` per setting (bits, baseline), one per stage, a panel per model; the model's FP value
    dashed over each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    groups = {m: list(dict.fromkeys(_setting(r) for r in rows if r["model"] == m and r["stage"] != "fp"))
              for m in models}
    stages = list(dict.fromkeys(stage_label(r) for r in rows if r["stage"] != "fp"))
    sizes = [max(1, len(groups[m])) for m in models]
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.0, 1.3 * sum(sizes) + 1.5 * len(models)), 4.4),
                             width_ratios=sizes, squeeze=False)
    for ax, model in zip(axes[0], models):
        _chart_panel(ax, rows, groups[model], stages, column)
        ax.set_title(model, fontsize=8)
    axes[0][0].set_ylabel(column.label + (" (log scale, lower is better)" if column.lower_is_better else ""))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(stages) + 1, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def _error_bars(rows: list[Row], values: list[float], column: Column) -> list[list[float]] | None:
    """Asymmetric error bars (below, above) from the rows' 95 % intervals; None when no row has one."""
    bounds = [r.get(f"{column.key}_interval") if column.interval else None for r in rows]
    if not any(bounds):
        return None
    return [[v - b[0] if b else 0.0 for v, b in zip(values, bounds)],
            [b[1] - v if b else 0.0 for v, b in zip(values, bounds)]]


def _chart_panel(ax: Any, rows: Sequence[Row], groups: list[tuple[str, str, str]], stages: list[str],
                 column: Column) -> None:
    colors = ["#9aa5b1", "#2f7ed8", "#8bbc21", "#f28f43"]
    width = 0.8 / max(1, len(stages))
    for k, stage in enumerate(stages):
        values = [next((r.get(column.key) or 0.0 for r in rows if _setting(r) == g and stage_label(r) == stage), 0.0)
                  for g in groups]
        xs = [i + (k - (len(stages) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=stage, color=colors[k % len(colors)], yerr=_error_bars(
            [next((r for r in rows if _setting(r) == g and stage_label(r) == stage), {}) for g in groups], values,
            column), capsize=2, error_kw={"linewidth": 0.8})
        ax.bar_label(bars, fmt=f"%.{min(column.digits, 1)}f", fontsize=7)
    fp = next((r.get(column.key) for r in rows if groups and r["model"] == groups[0][0] and r["stage"] == "fp"), None)
    if fp is not None:
        ax.axhline(fp, color="black", linestyle="dashed", linewidth=1, label="FP")
    ax.set_xticks(range(len(groups)), [b + (f"\n{s}".replace(" (", "\n(") if s else "") for _, b, s in groups],
                  fontsize=7)
    if column.lower_is_better:
        ax.set_yscale("log")


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


#: Flags that do not change a run's numbers (where it writes, how it loads, what it prints, the --config file whose
#: values are in the other flags) or that name the run itself (model, bit widths, weights file; stored as the
#: record's ``run``): left out of the configuration hash.
_NOT_CONFIG = ("out", "workers", "no_progress", "skip_fp", "save", "model", "w_bits", "a_bits", "checkpoint", "config")


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


def read_record(path: Path) -> dict[str, Any] | None:
    """A record file's content if it is a complete record, else None (partial, interrupted or foreign)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("complete") is not True or not isinstance(record.get("rows"), list):
        return None
    return record


def record_matches(record: dict[str, Any] | None, config: str, key: dict[str, Any]) -> bool:
    """Whether a complete record (:func:`read_record`) is of the run ``key`` made with configuration ``config``."""
    return record is not None and record.get("config_hash") == config and record.get("run") == key


def collect_records(folder: Path, runs: Sequence[tuple[str, str]]) -> tuple[list[Row], list[dict], list[str]]:
    """Rows of the complete records ``folder/<stem>.json`` of each (stem, configuration hash) in ``runs``;
    returns (rows, the records, missing stems). A row several records hold (the FP row of a model, evaluated with
    each of its runs) is taken once."""
    rows: list[Row] = []
    records: list[dict] = []
    missing: list[str] = []
    seen = set()
    for stem, config in runs:
        record = read_record(Path(folder) / f"{stem}.json")
        if record is None or record.get("config_hash") != config:
            missing.append(stem)
            continue
        records.append(record)
        for row in record["rows"]:
            key = (row["model"], row["bits"], baseline_label(row), row["stage"], row.get("form"))
            if key not in seen:  # the FP row is evaluated once per model; a baseline's options tell rows apart
                seen.add(key)
                rows.append(row)
    return rows, records, missing
