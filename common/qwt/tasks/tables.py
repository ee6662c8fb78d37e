"""One table runner and one assembler for every task folder, driven by the folder's ``configs/table.json``.

``table.json`` names the runs of the paper's table, either as models × bit settings (``models``, ``bits``: a run
per pair, the FP model evaluated with each model's first setting) or as explicit flag lists (``runs``), the task
(``parser``: ``vit``, ``resnet``, ``detection``, ``llm``), where results go, the weights-file suffixes, the flags
every run gets (``flags``, e.g. the authors' solver; the user's own come after and win), the reduced ``--smoke``
set, and for a table with published numbers the metrics to hold against ``configs/paper.json``. The runner checks
every run's flags and checkpoint first, runs each as ``<folder>/main.py`` in a child process (the run protocol,
:mod:`qwt.tasks.protocol`), skips runs that already have a complete record of the same run and configuration,
and stops its child on SIGTERM/SIGINT; the assembler reads only those complete records, lists the missing ones
and writes ``summary.json``, ``table.md`` (ours next to the paper, where there is one) and ``chart.png``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import check_writable_dir, hold_output_dir, run_cli
from ..errors import InputError
from ..report import Row, _fmt, collect_records, config_hash, read_record, record_matches
from . import protocol

#: How the paper's tables name each stage.
PAPER_METHODS = {"fp": "fp", "ptq": "ptq", "qwt": "ptq+qwt", "qwt*": "ptq+qwt*"}


@dataclass(frozen=True)
class Metric:
    key: str  # in our rows
    paper_key: str | None  # in a paper.json entry (None: the entry is the number itself)
    label: str


@dataclass(frozen=True)
class Table:
    folder: Path
    title: str
    parser: str
    out: str
    smoke: dict[str, Any]
    models: list[str] = field(default_factory=list)
    bits: list[list[int]] = field(default_factory=list)
    runs: list[list[str]] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    checkpoint_suffixes: list[str] = field(default_factory=list)
    flags: tuple[str, ...] = ()

    @classmethod
    def load(cls, folder: Path, name: str = "table") -> "Table":
        """``folder/configs/<name>.json``: the folder's table, or another one it describes (QwT-llm's gemma)."""
        path = folder / "configs" / f"{name}.json"
        if not path.is_file():
            others = sorted(p.stem for p in path.parent.glob("*.json") if p.stem != "paper") if name != "table" \
                else []
            raise InputError(f"{path} not found: " + (f"pass --table one of {', '.join(others)}" if others else
                             "pass a task folder (QwT-cls-RepQ-ViT, QwT-cls-ResNet, QwT-det-RepQ-ViT, QwT-llm)"))
        try:
            spec = json.loads(path.read_text())
            spec.pop("bits_note", None)
            needed = ("runs",) if "runs" in spec else ("models", "bits", "checkpoint_suffixes")
            missing = [key for key in ("title", "parser", "out", "smoke", *needed) if key not in spec]
            if missing:
                raise KeyError(", ".join(missing))
            spec["metrics"] = [Metric(*m) for m in spec.get("metrics", [])]
            spec["flags"] = tuple(spec.get("flags", ()))
            table = cls(folder=folder, **spec)
            table.task()
            return table
        except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise InputError(f"{path} is not a table description ({type(err).__name__}: {err})") from None

    @property
    def paper(self) -> Path:
        return self.folder / "configs" / "paper.json"

    def task(self) -> protocol.Task:
        """The task whose main.py runs the table (detection imported only when asked for)."""
        if self.parser == "detection":
            from .detection.pipeline import Detection

            return Detection()
        if self.parser == "llm":
            from .llm import LanguageModel

            return LanguageModel()
        if self.parser in ("vit", "resnet"):
            from .classification import Classification

            return Classification(self.parser)
        raise KeyError(f"parser {self.parser!r}: one of vit, resnet, detection, llm")


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
    """``scripts/reproduce_table.py FOLDER [--table NAME] [--checkpoints DIR | --smoke] [--out DIR] [main.py
    flags]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, help="folder of <model><suffix> FP weights")
    p.add_argument("--smoke", action="store_true", help="reduced random-init models on synthetic data (CI)")
    p.add_argument("--out", type=Path)
    p.add_argument("--table", default="table", metavar="NAME",
                   help="run the folder's configs/NAME.json instead of its table.json (QwT-llm: gemma)")
    args, extra = p.parse_known_args(argv)
    return run_cli(_reproduce, folder, args, extra)


def flag_lists(table: Table, args: argparse.Namespace, extra: list[str], out: Path) -> list[list[str]]:
    """Each run's flags: the description's, the run's own, (``--smoke``) the smoke set's, then the user's."""
    smoke = ["--smoke", "--no-progress", *table.smoke.get("flags", [])] if args.smoke else []
    if table.parser == "llm" and args.smoke:
        smoke.remove("--smoke")  # the language model's smoke flags name their own model (--tiny-random)
    common = [*table.flags, *smoke, *extra, "--out", str(out)]
    if table.runs:
        if args.checkpoints is not None:
            raise InputError(f"--checkpoints: {table.folder.name}'s table loads its model with --model DIR (a local "
                             "checkpoint folder; default: the one it names), not from a checkpoints folder")
        return [[*run, *common] for run in (table.smoke.get("runs", table.runs) if args.smoke else table.runs)]
    if not args.smoke and args.checkpoints is None:
        raise InputError("pass --checkpoints DIR and the task's data flag, or --smoke")
    models = table.smoke["models"] if args.smoke else table.models
    weights = checkpoints(args.checkpoints, models, table.checkpoint_suffixes) if args.checkpoints else {}
    lists = []
    for model in models:
        ckpt = ["--checkpoint", str(weights[model])] if model in weights else []
        for i, (w, a) in enumerate(table.bits):
            # The FP model is evaluated once per model, with its first bit setting.
            lists.append(["--model", model, "--w-bits", str(w), "--a-bits", str(a), *ckpt, *common,
                          *(["--skip-fp"] if i else [])])
    return lists


@dataclass(frozen=True)
class PlannedRun:
    """A run of the table: its flags, and the record it leaves (stem, configuration hash, run key)."""

    flags: list[str]
    stem: str
    config: str
    key: dict[str, Any]

    def done(self, out: Path) -> bool:
        return record_matches(read_record(out / f"{self.stem}.json"), self.config, self.key)


def plan(table: Table, lists: list[list[str]]) -> list[PlannedRun]:
    """Every run's flags parsed and checked up front (a bad flag fails before the first run)."""
    task, runs = table.task(), []
    for flags in lists:
        args = protocol.parse_args(task, "", flags)
        protocol.check(task, args)
        runs.append(PlannedRun(flags, task.stem(args), config_hash(args), task.run_key(args)))
    return runs


def _reproduce(folder: Path, args: argparse.Namespace, extra: list[str]) -> int:
    table = Table.load(folder, args.table)
    out = check_writable_dir(args.out or Path(table.out + ("_smoke" if args.smoke else "")), "--out")
    runs = plan(table, flag_lists(table, args, extra, out))
    with hold_output_dir(out, "--out"):  # held for the children too: they are started by this process
        for run in runs:
            if run.done(out):
                print(f"= {run.stem}: complete record with this configuration, skipped", flush=True)
                continue
            cmd = [sys.executable, str(table.folder / "main.py"), *run.flags]
            print("+", " ".join(cmd), flush=True)
            code = run_child(cmd)
            if code != 0:
                return code
        return assemble(out, [(r.stem, r.config) for r in runs], table)


def comparison_table(rows: Sequence[Row], paper: dict[str, Any], metrics: Sequence[Metric]) -> str:
    """Markdown: for every (model, bits, stage) either side has, each metric ours | paper | difference. Ours are
    the dense QwT rows (the paper's form)."""
    ours = {(r["model"], r["bits"], PAPER_METHODS[r["stage"]]): r for r in rows if r.get("form") in (None, "dense")}
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
    labels = {"fp": "FP", "ptq": "PTQ", "ptq+qwt": "PTQ+QwT", "ptq+qwt*": "PTQ+QwT*"}
    for key in dict.fromkeys([*ours, *published]):
        cells = [key[0], key[1], labels.get(key[2], key[2])]
        for m in metrics:
            mine = ours.get(key, {}).get(m.key)
            theirs = published.get(key)
            theirs = theirs.get(m.paper_key) if isinstance(theirs, dict) else theirs
            diff = "–" if mine is None or theirs is None else f"{mine - theirs:+.2f}"
            cells += [_fmt(mine), _fmt(theirs, 1), diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPaper numbers: {paper.get('source', '')}\n"


def assemble(folder: Path, runs: Sequence[tuple[str, str]], table: Table, absent: Sequence[str] = ()) -> int:
    """Write the table from the complete records ``folder/<stem>.json`` of each (stem, configuration hash) in
    ``runs``; returns 1 (after writing what exists) when some runs are missing (no such record, or one of
    ``absent``), else 0."""
    rows, records, missing = collect_records(folder, runs)
    missing += absent
    environments = list({json.dumps(r.get("environment"), sort_keys=True): r.get("environment")
                         for r in records}.values())
    if not rows:
        raise InputError(f"no complete record of this table's runs in {folder}")
    task = table.task()
    keys = {"model", "bits", "stage"} | {c.key for c in task.columns}
    for r in rows:
        if not keys <= set(r) or r["stage"] not in PAPER_METHODS:
            raise InputError(f"malformed result row in {folder}: {r} (needs {sorted(keys)})")
    comparison = ""
    if table.metrics and table.paper.is_file():
        comparison = comparison_table(rows, json.loads(table.paper.read_text()), table.metrics)
    footer = f"\nMissing runs (no complete record of the table's configuration): {', '.join(missing)}\n" \
        if missing else ""
    text = protocol.write_tables(folder, rows, records, task.columns, table.title,
                                 {"environment": environments, "missing": missing}, comparison, footer)
    print(text)
    if missing:
        print(f"missing runs (no complete record of the table's configuration): {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


def assemble_folder(folder: Path, results: Path, config: str | None = None) -> int:
    """``scripts/assemble_table.py``: assemble ``results`` for the task ``folder`` (a models × bits table) from its
    complete records of one configuration (``config``, or the only one present); other JSON in ``results`` is
    ignored and named."""
    table = Table.load(folder)
    if table.runs:
        raise InputError(f"{folder.name}'s table is a list of runs whose flags differ: scripts/reproduce_table.py "
                         f"{folder.name} assembles it (finished runs are skipped), there is nothing to assemble here")
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
    return assemble(results, [(stem, config) for stem in stems], table,
                    absent_runs(table, [complete[s]["run"] for s in stems]))


def absent_runs(table: Table, runs: Sequence[dict[str, Any]]) -> list[str]:
    """The table's model × bits entries that none of ``runs`` (record ``run`` keys) covers, as ``model WxAy``.
    Smoke records are held against the table's smoke models."""
    models = table.smoke["models"] if any(run.get("smoke") for run in runs) else table.models
    done = {(run.get("model"), run.get("bits")) for run in runs}
    return [f"{model} W{w}A{a}" for model in models for w, a in table.bits
            if not any(m == model and (b == f"W{w}A{a}" or str(b).startswith(f"W{w}A{a}-")) for m, b in done)]
