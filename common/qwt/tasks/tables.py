"""One table runner and one assembler for every task folder, driven by the folder's ``configs/table.json``.

``table.json`` names the models × bit settings of the paper's table, the task's command-line parser, the
metrics (with their key in ``configs/paper.json``), where results go, the weights-file suffixes, the flags every
run of the table gets (``flags``, e.g. the authors' solver; the user's own flags come after and win) and the
reduced ``--smoke`` set. The runner checks every checkpoint first, runs each model × bits as ``<folder>/main.py`` in a
child process (the FP model once per model), skips runs that already have a complete record of the same
configuration, and stops its child on SIGTERM/SIGINT; the assembler reads only complete records of that
configuration, lists the missing ones and writes ``summary.json``, ``table.md`` (ours next to the paper) and,
for top-1 tables, the per-model tables and ``chart.png``.

The language model's table (``"parser": "llm"``) is one run: its ``main.py`` evaluates every bit setting in one
process and writes the whole table itself, so the runner starts it once with the description's flags (``--smoke``:
its ``smoke`` flags) and there is nothing to resume or assemble; such a description names no models, bit pairs,
metrics or weights files.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import check_writable_dir, hold_output_dir, run_cli
from ..errors import InputError
from ..report import Row, _fmt, atomic_write, bar_chart, collect_records, markdown_table, resume_plan

METHOD_LABELS = {"fp": "FP", "ptq": "PTQ", "ptq+qwt": "PTQ+QwT", "ptq+qwt*": "PTQ+QwT*"}


@dataclass(frozen=True)
class Metric:
    key: str  # in our rows
    paper_key: str | None  # in a paper.json entry (None: the entry is the number itself)
    label: str


#: The one parser whose table is a single run (see the module docstring).
ONE_RUN_PARSER = "llm"
#: What a table of model × bits runs needs besides title, parser, out and smoke.
_RUNS_KEYS = ("models", "bits", "metrics", "checkpoint_suffixes")


@dataclass(frozen=True)
class Table:
    folder: Path
    title: str
    parser: str
    out: str
    smoke: dict[str, list[str]]
    models: list[str] = field(default_factory=list)
    bits: list[list[int]] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    checkpoint_suffixes: list[str] = field(default_factory=list)
    flags: tuple[str, ...] = ()

    @classmethod
    def load(cls, folder: Path) -> "Table":
        path = folder / "configs" / "table.json"
        if not path.is_file():
            raise InputError(f"{path} not found: pass a task folder (QwT-cls-RepQ-ViT, QwT-cls-ResNet, "
                             "QwT-det-RepQ-ViT, QwT-llm)")
        try:
            spec = json.loads(path.read_text())
            spec.pop("bits_note", None)
            needed = () if spec.get("parser") == ONE_RUN_PARSER else _RUNS_KEYS
            missing = [key for key in (*needed, "smoke") if key not in spec]
            if missing:
                raise KeyError(", ".join(missing))
            spec["metrics"] = [Metric(*m) for m in spec.get("metrics", [])]
            spec["flags"] = tuple(spec.get("flags", ()))
            return cls(folder=folder, **spec)
        except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise InputError(f"{path} is not a table description ({type(err).__name__}: {err})") from None

    @property
    def one_run(self) -> bool:
        return self.parser == ONE_RUN_PARSER

    @property
    def paper(self) -> Path:
        return self.folder / "configs" / "paper.json"


def _task_parser(name: str) -> tuple[Callable[[list[str]], argparse.Namespace], Callable[[Any], str]]:
    """The task's flag parser and record-stem function (detection imported only when asked for)."""
    if name == "detection":
        from .detection.pipeline import build_parser, run_stem

        return build_parser("").parse_args, run_stem
    from .classification import build_parser, run_stem

    return build_parser(name, "").parse_args, run_stem


def checkpoints(folder: Path, models: Sequence[str], suffixes: Sequence[str]) -> dict[str, Path]:
    """Every weights file the table needs, found before the first run starts (not after hours of it)."""
    if not folder.is_dir():
        raise InputError(f"--checkpoints {folder} is not a folder")
    found = {m: next((folder / f"{m}{s}" for s in suffixes if (folder / f"{m}{s}").is_file()), None) for m in models}
    missing = [f"{folder}/{m}{{{','.join(suffixes)}}}" for m, path in found.items() if path is None]
    if missing:
        raise InputError(f"{len(missing)} checkpoint(s) missing: " + ", ".join(missing))
    return found


def run_child(cmd: list[str]) -> int:
    """Run one table entry; on SIGTERM/SIGINT stop the child too (it leaves its record marked incomplete)."""
    child = subprocess.Popen(cmd)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def reproduce(folder: Path, argv: list[str] | None = None) -> int:
    """``scripts/reproduce_table.py FOLDER [--checkpoints DIR | --smoke] [--out DIR] [main.py flags]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, help="folder of <model><suffix> FP weights")
    p.add_argument("--smoke", action="store_true", help="reduced random-init models on synthetic data (CI)")
    p.add_argument("--out", type=Path)
    args, extra = p.parse_known_args(argv)
    return run_cli(_reproduce, folder, args, extra)


def _reproduce(folder: Path, args: argparse.Namespace, extra: list[str]) -> int:
    table = Table.load(folder)
    out = check_writable_dir(args.out or Path(table.out + ("_smoke" if args.smoke else "")), "--out")
    if table.one_run:
        return _reproduce_one_run(table, args, extra, out)
    if not args.smoke and args.checkpoints is None:
        raise InputError("pass --checkpoints DIR and the task's data flag, or --smoke")
    models = table.smoke["models"] if args.smoke else table.models
    extra = [*table.flags, *extra]
    if args.smoke:
        extra = [*extra, "--smoke", "--no-progress", *table.smoke["flags"]]
    weights = checkpoints(args.checkpoints, models, table.checkpoint_suffixes) if args.checkpoints else {}
    flag_lists = []
    for model in models:
        ckpt = ["--checkpoint", str(weights[model])] if model in weights else []
        for i, (w, a) in enumerate(table.bits):
            # The FP model is evaluated once per model, with its first bit setting.
            flag_lists.append(["--model", model, "--w-bits", str(w), "--a-bits", str(a), "--out", str(out), *ckpt,
                               *extra, *(["--skip-fp"] if i else [])])
    parse, stem = _task_parser(table.parser)
    todo, stems, config = resume_plan(out, flag_lists, parse, stem)
    with hold_output_dir(out, "--out"):  # held for the children too: they are started by this process
        for flags, _ in todo:
            cmd = [sys.executable, str(table.folder / "main.py"), *flags]
            print("+", " ".join(cmd), flush=True)
            code = run_child(cmd)
            if code != 0:
                return code
        return assemble(out, stems, config, table)


def _reproduce_one_run(table: Table, args: argparse.Namespace, extra: list[str], out: Path) -> int:
    """The table that one run of the task's main.py writes whole: the description's flags, then (``--smoke``) its
    smoke flags, then the user's. The run itself holds ``out`` and refuses one that holds results already."""
    if args.checkpoints is not None:
        raise InputError(f"--checkpoints: {table.folder.name}'s table loads its model with --model DIR (a local "
                         "checkpoint folder; default: the one it names), not from a checkpoints folder")
    smoke = ["--no-progress", *table.smoke["flags"]] if args.smoke else []
    cmd = [sys.executable, str(table.folder / "main.py"), *table.flags, *smoke, *extra, "--out", str(out)]
    print("+", " ".join(cmd), flush=True)
    return run_child(cmd)


def comparison(rows: Sequence[Row], paper: dict[str, Any], metrics: Sequence[Metric]) -> str:
    """Markdown: for every (model, bits, method) either side has, each metric ours | paper | difference."""
    ours = {(r["model"], r["bits"], r["method"]): r for r in rows}
    published: dict[tuple[str, str, str], Any] = {}
    for model, entry in paper["models"].items():
        if entry.get("fp") is not None:
            published[(model, "FP", "fp")] = entry["fp"]
        for bits, methods in entry.items():
            if bits != "fp":
                published.update({(model, bits, method): value for method, value in methods.items()})
    head = "| model | bits | method | " + " | ".join(f"ours {m.label} | paper {m.label} | ours − paper"
                                                       for m in metrics) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(metrics))]
    for key in dict.fromkeys([*ours, *published]):
        cells = [key[0], key[1], METHOD_LABELS.get(key[2], key[2])]
        for m in metrics:
            mine = ours.get(key, {}).get(m.key)
            theirs = published.get(key)
            theirs = theirs.get(m.paper_key) if isinstance(theirs, dict) else theirs
            diff = "–" if mine is None or theirs is None else f"{mine - theirs:+.2f}"
            cells += [_fmt(mine), _fmt(theirs, 1), diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPaper numbers: {paper.get('source', '')}\n"


def assemble(folder: Path, stems: Sequence[str], config: str, table: Table, absent: Sequence[str] = ()) -> int:
    """Write the table from the complete records ``folder/<stem>.json`` made with configuration ``config``;
    returns 1 (after writing what exists) when some runs are missing (a listed stem without such a record, or
    one of ``absent``), else 0."""
    rows, environments, missing = collect_records(folder, stems, config)
    missing = [*missing, *absent]
    if not rows:
        raise InputError(f"no complete record with configuration {config} in {folder}")
    keys = {"model", "bits", "method"} | {m.key for m in table.metrics}
    for r in rows:
        if not keys <= set(r) or r["method"] not in METHOD_LABELS:
            raise InputError(f"malformed result row in {folder}: {r} (needs {sorted(keys)})")
    text = f"## {table.title}\n\n" + comparison(rows, json.loads(table.paper.read_text()), table.metrics)
    if any(m.key == "top1" for m in table.metrics):
        models = list(dict.fromkeys(r["model"] for r in rows))
        text += "\n" + "\n\n".join(markdown_table(rows, m) for m in models) + "\n"
        bar_chart(rows, folder / "chart.png", table.title)
    if missing:
        text += f"\nMissing runs (no complete record with configuration {config}): {', '.join(missing)}\n"
    summary = {"config_hash": config, "environment": environments, "missing": missing, "rows": rows}
    atomic_write(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(folder / "table.md", text)
    print(text)
    if missing:
        print(f"missing runs (no complete record with configuration {config}): {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


def assemble_folder(folder: Path, results: Path, config: str | None = None) -> int:
    """``scripts/assemble_table.py``: assemble ``results`` for the task ``folder`` from its complete records of
    one configuration (``config``, or the only one present); other JSON in ``results`` is ignored and named."""
    from collections import Counter

    from ..report import read_record

    table = Table.load(folder)
    if table.one_run:
        raise InputError(f"{folder.name}'s table is written whole by its one run (table.md in that run's --out); "
                         "there is nothing to assemble")
    if not results.is_dir():
        raise InputError(f"{results} is not a folder of run records")
    records = {f.stem: read_record(f) for f in sorted(results.glob("*.json")) if f.name != "summary.json"}
    complete = {stem: r for stem, r in records.items() if r is not None and isinstance(r.get("run"), dict)}
    known = {*table.models, *table.smoke["models"]}
    foreign = [f"{stem} ({r['run'].get('model')})" for stem, r in complete.items()
               if r["run"].get("model") not in known]
    if foreign:
        raise InputError(f"{results} holds records of models that are not in {folder}'s table: {', '.join(foreign)}; "
                         "assemble each task's results with its own task folder")
    hashes = Counter(r.get("config_hash") for r in complete.values())
    if config is None:
        if len(hashes) != 1:
            found = ", ".join(f"{h} ({n} runs)" for h, n in hashes.items()) or "none"
            raise InputError(f"{results}: complete records of one configuration expected, found {found}; "
                             "pass --config-hash")
        config = next(iter(hashes))
    ignored = sorted(stem for stem in records if stem not in complete)
    if ignored:
        print(f"ignored (incomplete, damaged or not a run record): {', '.join(ignored)}", file=sys.stderr)
    stems = [stem for stem, r in complete.items() if r.get("config_hash") == config]
    return assemble(results, stems, config, table, absent_runs(table, [complete[s]["run"] for s in stems]))


def absent_runs(table: Table, runs: Sequence[dict[str, Any]]) -> list[str]:
    """The table's model × bits entries that none of ``runs`` (record ``run`` keys) covers, as ``model WxAy``.
    Smoke records are held against the table's smoke models."""
    models = table.smoke["models"] if any(run.get("smoke") for run in runs) else table.models
    done = {(run.get("model"), run.get("bits")) for run in runs}
    return [f"{model} W{w}A{a}" for model in models for w, a in table.bits
            if not any(m == model and (b == f"W{w}A{a}" or str(b).startswith(f"W{w}A{a}-")) for m, b in done)]
