"""The one run protocol every task runs through: flags → configs → checks → FP → PTQ → QwT rows → records.

A task (classification, detection, the language model, the main job) says only what is its own: its flags, the
PTQ settings and QwT forms they ask for, the checks it can make without compute, how it loads model and data
(a :class:`Session`: ``evaluate(model) -> {metric: value}``, and how it quantises and compensates) and which
metric columns its table shows. :func:`run` owns the rest, the same way for every task:

* ``--config FILE`` (a JSON object of flag settings) passes through exactly the checks of the flags themselves,
  and everything that can be checked without compute is checked before the first model is loaded;
* the ``--out`` folder is held for the run (a second run on it waits for nothing: it is refused);
* the run's record ``OUT/<stem>.json`` is rewritten after every row (``complete`` only after the last), so a crash
  loses nothing already computed; a complete record of the same run and configuration is kept and the run is
  skipped (resume), one of another configuration is refused, never overwritten;
* each bit setting starts from the same seed (a resumed or reordered run gives the same numbers), each row has its
  own seconds and peak memory, and every QwT row its per-block reports (``OUT/details/<stem>.json``);
* the markdown table ``OUT/<stem>.md`` and the chart ``OUT/<stem>.png`` are written from the complete record, with
  the machine it ran on (:func:`qwt.environment.environment`).

Rows: ``model``, ``bits``, ``baseline`` (and ``baseline_options``), ``stage`` (``fp``, ``ptq``, ``qwt``,
``qwt*``), ``form`` (the QwT form of a ``qwt`` row: ``QwTConfig.form_name``), the task's metrics,
``ptq_seconds``, ``qwt_seconds``, ``size_mb``, ``peak_memory_mb`` and, on QwT rows, ``blocks_kept``/``blocks``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from ..api import apply_qwt, quantize
from ..cli import check_device, check_writable_dir, hold_output_dir, run_cli
from ..compensation import BlockReport, QwTConfig, model_guard
from ..compensation.blockwise import check_qwt_config, compensated_blocks
from ..compensation.features import DISK
from ..environment import environment
from ..family import Family
from ..errors import InputError
from ..ptq import PTQConfig
from ..ptq.config import bit_tag
from ..report import (Column, Row, atomic_write, baseline_label, config_hash, file_sha256, read_record,
                      record_matches, results_chart, results_table)
from ..serialization import check_save_target, save_quantized
from ..size import model_size_mb
from ..utils import PhaseTimer, seed_everything
from .cli import HelpFormatter, init_distributed
from .memory import PeakMemory


class Session(ABC):
    """What a task loaded for one run: the FP model, its data, and how it evaluates, quantises and compensates.

    The defaults quantise on ``calib`` and compensate on ``comp`` in batches of ``batch_size``; a task whose
    model needs another forward or block plan overrides :meth:`quantize` / :meth:`compensate`."""

    label: str  # the model's name in rows and tables
    fp_model: nn.Module
    #: the model's family: its layer rule refuses a setting it cannot run, before the FP evaluation
    family: Family
    calib: Any = None
    comp: Any = None
    batch_size: int = 32
    #: what data the run used (counts, sources), for the record
    data: dict[str, Any]
    progress: bool = False

    @abstractmethod
    def evaluate(self, model: nn.Module, desc: str) -> dict[str, Any]:
        """The task's metrics of ``model``: the keys of the task's ``columns``, and ``<key>_interval`` ([low, high],
        95 %) for a column with ``interval``."""

    def quantize(self, model: nn.Module, config: PTQConfig, on_phase: PhaseTimer) -> None:
        quantize(model, self.calib, config, on_phase=on_phase)

    def compensate(self, model: nn.Module, config: QwTConfig) -> list[BlockReport]:
        return apply_qwt(model, self.comp, config, batch_size=self.batch_size, progress=self.progress)

    #: held-out score of a model (lower is better) for the model-level guard, or None: no model-level guard
    heldout_score: Callable[[nn.Module], float] | None = None

    def heldout_record(self) -> dict[str, Any]:
        """What the model-level guard scored on, for the row (e.g. how many held-out windows)."""
        return {}

    def after_row(self, row: Row, model: nn.Module, first_form: bool) -> None:
        """Called with every PTQ and QwT row and its model (e.g. a language model's sample continuation)."""

    def refine(self, fp_model: nn.Module, model: nn.Module) -> nn.Module | None:
        """A further stage on the first QwT form's model (``qwt*``: fine-tuned compensation), or None."""
        return None

    def save(self, model: nn.Module, path: Path, config: PTQConfig, row: Row) -> None:
        """Save a compensated model (tasks that offer ``--save``)."""
        raise NotImplementedError

    def notes(self) -> str:
        """Markdown under the table (e.g. sample continuations)."""
        return ""

    def details(self) -> dict[str, Any]:
        """The task's own entries for ``OUT/details/<stem>.json`` beside the protocol's (e.g. GPTQ's per-layer
        errors), JSON-able."""
        return {}


class Task(ABC):
    """A task's own part of a run (see the module docstring)."""

    name: str
    #: default --out
    out: str
    #: the metric columns of its table; the first is the headline (gap closed, chart)
    columns: ClassVar[tuple[Column, ...]]
    #: the task offers --save (its compensated models can be saved and reloaded)
    saves: ClassVar[bool] = False

    @abstractmethod
    def add_flags(self, p: argparse.ArgumentParser) -> None:
        """The task's flags (the protocol adds --config, --out, --device, --seed, --skip-fp, --no-progress and,
        for a task that saves, --save)."""

    @abstractmethod
    def settings(self, args: argparse.Namespace) -> list[PTQConfig]:
        """The PTQ settings the flags ask for, resolved and checked (no compute)."""

    @abstractmethod
    def qwt_configs(self, args: argparse.Namespace) -> list[QwTConfig]:
        """The QwT forms fitted on every setting, checked (no compute)."""

    def check(self, args: argparse.Namespace) -> None:
        """Input checks that need no model (files, folders); raise InputError."""

    @abstractmethod
    def stem(self, args: argparse.Namespace) -> str:
        """The run's record name in --out: everything that tells it from another run of the same table."""

    def run_key(self, args: argparse.Namespace) -> dict[str, Any]:
        """What the record is a run of; a resume needs the same key. The default suits a task with ``--model``,
        ``--w-bits``/``--a-bits``, ``--smoke`` and ``--checkpoint`` (:func:`weights_key`)."""
        return weights_key(args)

    @abstractmethod
    def open(self, args: argparse.Namespace, rank: int, world: int) -> contextlib.AbstractContextManager[Session]:
        """Load model and data (a context: temporary folders are removed after the run)."""

    def save_name(self, args: argparse.Namespace, config: PTQConfig, form: str, only: bool) -> str:
        """``--save`` sub-folder of one setting's compensated model ('' when the run has only one: SAVE itself)."""
        return "" if only else config.tag + ("" if form == "dense" else f"-{form}")

    def title(self, args: argparse.Namespace) -> str:
        return f"{self.name}: {args.model if getattr(args, 'model', None) else ''}".rstrip(": ")


def weights_key(args: argparse.Namespace) -> dict[str, Any]:
    """What one record is a run of: model, bit label, smoke or not, and the weights file by path and by content
    (a file replaced under the same name is another run)."""
    checkpoint = args.checkpoint
    return {"model": args.model, "bits": bit_tag(args.w_bits, args.a_bits, args.conv_act_bits),
            "smoke": bool(args.smoke), "checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint)}


# -- flags -------------------------------------------------------------------------------------------------------

def build_parser(task: Task, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", type=Path,
                   help="JSON object of flag settings (keys as the flags' names with _, e.g. "
                        '{"w_bits": 4, "method_option": {"act_order": true}}); each is checked as the flag would be, '
                        "and flags on the command line win")
    task.add_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--skip-fp", action="store_true", help="no FP row (the FP model is still used as the reference)")
    if task.saves:
        g.add_argument("--save", type=Path, help="save the compensated model(s) here (safetensors + json; several "
                                                 "settings or forms: one sub-folder each, named by them)")
    g.add_argument("--out", type=Path, default=Path(task.out), help="folder of the run's record, table and chart")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cpu, cuda, cuda:1, ...)")
    g.add_argument("--seed", type=int, default=0, help="seeds every random draw; each bit setting starts from it")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_argv(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The flags a ``--config`` file stands for, written as a command line, so that its values pass through
    exactly the checks (types, choices) of the flags themselves."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--config {path}: {err}") from None
    if not isinstance(settings, dict):
        raise InputError(f'--config {path}: expected a JSON object of flag settings, e.g. {{"seed": 1}}')
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(set(settings) - set(flags))
    if unknown:
        raise InputError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    argv: list[str] = []
    for key, value in settings.items():
        argv += _flag_argv(flags[key], key, value, path)
    return argv


def _flag_argv(action: argparse.Action, key: str, value: Any, path: Path) -> list[str]:
    flag = action.option_strings[-1]
    if value is None:
        return []  # the flag's default
    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            raise InputError(f"--config {path}: {key} is true or false, got {value!r}")
        return [flag] if value else []
    if action.nargs in ("+", "*"):
        return [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
    if isinstance(action, argparse._AppendAction):  # --method-option: a list of NAME=VALUE, or an object
        items = [f"{k}={_text(v)}" for k, v in value.items()] if isinstance(value, dict) else \
            value if isinstance(value, list) else [value]
        return [f"{flag}={item}" for item in items]
    if isinstance(value, (list, dict)):
        raise InputError(f"--config {path}: {key} takes one value, got {value!r}")
    return [f"{flag}={_text(value)}"]


def _text(value: Any) -> str:
    """A JSON value as the command line writes it (true/false for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_args(task: Task, description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, after a ``--config`` file's settings (checked alone first, so that a bad value is named as the
    file's); the command line wins."""
    p = build_parser(task, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    alone, _ = _lenient_parser(task, description).parse_known_args(argv)  # the file may give a required flag
    if alone.config is None:
        return p.parse_args(argv)
    path = alone.config
    from_file = config_argv(p, path)
    checker = _lenient_parser(task, description)

    def refuse(message: str) -> NoReturn:
        raise InputError(f"--config {path}: {message}")

    checker.error = refuse  # type: ignore[method-assign]
    checker.parse_known_args(from_file)
    args = p.parse_args(from_file + argv)
    for action in p._actions:
        if action.required and getattr(alone, action.dest) is None:  # left to the file
            setattr(alone, action.dest, getattr(args, action.dest))
    _name_the_file(task, args, alone, path)
    return args


def _lenient_parser(task: Task, description: str) -> argparse.ArgumentParser:
    """The task's parser with no flag required: the file need not hold what the command line gives, nor the
    command line what the file gives."""
    p = build_parser(task, description)
    for action in p._actions:
        action.required = False
    return p


def _name_the_file(task: Task, args: argparse.Namespace, alone: argparse.Namespace, path: Path) -> None:
    """Some values are checked only together with others (a method's options, a method the model's family cannot
    take), so not by the file's parse: when the run's settings refuse a value and the command line ``alone`` (with
    the required flags it left to the file) passes, the file's value is the one refused, and is named so."""
    try:
        _check_settings(task, copy.copy(args))
    except (InputError, ValueError) as err:
        try:
            _check_settings(task, alone)
        except (InputError, ValueError):
            return  # the command line's own value: refused as such by check()
        raise InputError(f"--config {path}: {err}") from None


def _check_settings(task: Task, args: argparse.Namespace) -> None:
    task.settings(args)
    task.qwt_configs(args)


# -- checks ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """A run's checked configuration: its PTQ settings and QwT forms."""

    settings: list[PTQConfig]
    forms: list[QwTConfig]

    @property
    def only(self) -> bool:
        """One setting and one form: a ``--save`` goes to SAVE itself, not a sub-folder."""
        return len(self.settings) * len(self.forms) == 1


def check(task: Task, args: argparse.Namespace) -> Plan:
    """Every check that needs no model, the task's own included; refuses repeated settings or forms (a second row
    of the same name would replace the first's record)."""
    settings, forms = task.settings(args), task.qwt_configs(args)
    _refuse_repeats("bit setting", [setting_name(c) for c in settings])
    _refuse_repeats("QwT form", [f.form_name for f in forms])
    check_device(args.device)
    for form in forms:
        if form.feature_device not in (None, DISK):
            check_device(form.feature_device, "--feature-device")
    check_writable_dir(args.out, "--out")
    task.check(args)
    plan = Plan(settings, forms)
    if getattr(args, "save", None) is not None:
        _check_save(task, args, plan)
    return plan


def _refuse_repeats(what: str, values: list[str]) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(f"{what} {', '.join(repeated)} given more than once; give each once")


def _check_save(task: Task, args: argparse.Namespace, plan: Plan) -> None:
    save = check_writable_dir(args.save, "--save")
    out = Path(os.path.abspath(args.out))
    if Path(os.path.abspath(save)) in (out, *out.parents):
        raise InputError(f"--save {args.save} would hold the run's records (--out {args.out}), and a save "
                         "replaces only a folder holding a previous save; pass a --save outside --out")
    for config in plan.settings:
        for form in plan.forms:
            check_save_target(save / task.save_name(args, config, form.form_name, plan.only))


def _resume_or_refuse(args: argparse.Namespace, stem: str, config: str, key: dict[str, Any]) -> bool:
    """True when ``OUT/<stem>.json`` is a complete record of this very run (``key``) and configuration (nothing
    to do); refuses a complete record of another configuration (it would be replaced). An incomplete record is
    the protocol's own unfinished write and is run again."""
    record = read_record(Path(args.out) / f"{stem}.json")
    if record is None:
        return False
    if record_matches(record, config, key):
        print(f"= {args.out}/{stem}.json: a complete record of this run and configuration is there; nothing to do "
              "(pass another --out to run it again)", flush=True)
        return True
    raise InputError(f"--out {args.out} already holds a complete record of {stem} made with other settings or "
                     "another weights file; pass another --out or move that record away first")


# -- the run -----------------------------------------------------------------------------------------------------

def main(task: Task, description: str, argv: Sequence[str] | None = None) -> int:
    """A task's ``main.py``: one run, input errors as one ``error:`` line (exit 2)."""
    return run_cli(lambda: run(task, parse_args(task, description, argv)))


def run(task: Task, args: argparse.Namespace) -> int:
    """Check, hold --out, run (or skip a finished run), write; under torchrun only rank 0 writes."""
    plan = check(task, args)
    stem, config, key = task.stem(args), config_hash(args), task.run_key(args)
    writer = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK before the process group exists
    with hold_output_dir(args.out, "--out") if writer else contextlib.nullcontext():
        if _resume_or_refuse(args, stem, config, key):
            return 0
        rank, world = init_distributed(args.device)
        try:
            seed_everything(args.seed)
            memory = PeakMemory(args.device)  # the FP row's peak: loading and evaluating the FP model
            with task.open(args, rank, world) as session:
                Run(task, args, session, plan, stem, config, key, writer, memory).go()
        finally:
            if world > 1:
                dist.destroy_process_group()
    return 0


@dataclass
class Run:
    """One run's state: the rows so far, the per-block reports, and the record they are written to."""

    task: Task
    args: argparse.Namespace
    session: Session
    plan: Plan
    stem: str
    config: str  # the configuration hash and the run key, as the record states them
    key: dict[str, Any]
    writer: bool
    memory: PeakMemory
    rows: list[Row] = field(default_factory=list)
    blocks: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def go(self) -> None:
        self.environment = environment(self.args.device)
        s = self.session
        for config in self.plan.settings:  # e.g. mixture-of-experts weights a row's label would not cover
            s.family.layer_rule(s.fp_model, config)
        blocks = compensated_blocks(s.family.plan(s.fp_model))
        for form in self.plan.forms:  # e.g. a --start-block past the model's last block
            check_qwt_config(form, blocks)
        if not self.args.skip_fp:
            self.add(self.row("FP", None, "fp", None, s.evaluate(s.fp_model, "FP"), s.fp_model))
            s.after_row(self.rows[-1], s.fp_model, True)
        for config in self.plan.settings:
            self.setting(config)
        self.write(complete=True)
        if self.writer:
            print((Path(self.args.out) / f"{self.stem}.md").read_text(), flush=True)

    def setting(self, config: PTQConfig) -> None:
        """The baseline's row, then a row per QwT form, each fitted on its own copy of the baseline."""
        s, tag = self.session, config.tag
        seed_everything(self.args.seed)
        self.memory.reset()
        base = copy.deepcopy(s.fp_model).eval()
        timer = PhaseTimer()
        s.quantize(base, config, timer)
        ptq_seconds = timer.total
        self.add(self.row(tag, config, "ptq", None, s.evaluate(base, f"{tag} PTQ"), base, ptq_seconds=ptq_seconds))
        s.after_row(self.rows[-1], base, True)
        start = time.perf_counter()
        guarded = s.heldout_score is not None and any(f.guard_fraction > 0 for f in self.plan.forms)
        base_held = s.heldout_score(base) if guarded else None
        guard_seconds = time.perf_counter() - start
        for k, form in enumerate(self.plan.forms):
            last = k == len(self.plan.forms) - 1
            model = base if last and base_held is None else copy.deepcopy(base)
            self.qwt_row(config, model, base, base_held, ptq_seconds, guard_seconds, form, k == 0)

    def qwt_row(self, config: PTQConfig, model: nn.Module, base: nn.Module, base_held: float | None,
                ptq_seconds: float, guard_seconds: float, form: QwTConfig, first: bool) -> None:
        s, tag = self.session, config.tag
        self.memory.reset()
        start = time.perf_counter()
        reports = s.compensate(model, form)
        extra: dict[str, Any] = {}
        if base_held is not None and form.guard_fraction > 0:  # the model-level half of the guard
            model, decision = model_guard(base, model, reports, s.heldout_score, base_held)
            extra["output_guard"] = {**s.heldout_record(), **decision}
        qwt_seconds = guard_seconds + time.perf_counter() - start
        metrics = s.evaluate(model, f"{tag} PTQ+QwT {form.form_name}")
        row = self.row(tag, config, "qwt", form.form_name, metrics, model, ptq_seconds=ptq_seconds,
                       qwt_seconds=qwt_seconds, blocks_kept=sum(r.applied for r in reports), blocks=len(reports),
                       **extra)
        self.blocks[f"{setting_name(config)} {form.form_name}"] = [r.to_dict() for r in reports]
        self.add(row)
        s.after_row(row, model, first)
        if getattr(self.args, "save", None) is not None and self.writer:
            name = self.task.save_name(self.args, config, form.form_name, self.plan.only)
            s.save(model, Path(self.args.save) / name, config, row)
        if first:
            self.refined(config, model, row)

    def refined(self, config: PTQConfig, model: nn.Module, row: Row) -> None:
        start = time.perf_counter()
        self.memory.reset()
        star = self.session.refine(self.session.fp_model, model)
        if star is None:
            return
        seconds = row["qwt_seconds"] + time.perf_counter() - start
        metrics = self.session.evaluate(star, f"{config.tag} PTQ+QwT*")
        self.add(self.row(config.tag, config, "qwt*", row["form"], metrics, star, ptq_seconds=row["ptq_seconds"],
                          qwt_seconds=seconds))

    def row(self, bits: str, config: PTQConfig | None, stage: str, form: str | None, metrics: dict[str, float],
            model: nn.Module, **extra: Any) -> Row:
        baseline = None if config is None else config.resolved_baseline()
        row: Row = {"model": self.session.label, "bits": bits, "baseline": None if baseline is None else baseline.name,
                    "stage": stage, "form": form, **metrics}
        if baseline is not None and baseline.chosen_options():
            row["baseline_options"] = baseline.chosen_options()
        return {**row, **extra, "size_mb": model_size_mb(model), "peak_memory_mb": self.memory.read_mb()}

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if self.writer:
            stage = row["stage"] + (f" {row['form']}" if row["form"] else "")
            shown = ", ".join(f"{c.label} {row[c.key]:.{c.digits}f}" for c in self.task.columns if c.key in row)
            print(f"[{row['model']}] {row['bits']} {row['baseline'] or ''} {stage}: {shown}", flush=True)
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        """The record (rewritten after every row), and with the last row the table and chart."""
        if not self.writer:
            return
        out, args = Path(self.args.out), self.args
        record = {"complete": complete, "task": self.task.name, "config_hash": self.config,
                  "run": self.key, "environment": self.environment, "data": self.session.data,
                  "peak_memory": "per row" if self.memory.per_row else "running max",
                  "columns": [asdict(c) for c in self.task.columns], "rows": self.rows}
        details = {"blocks": self.blocks, "ptq": [c.to_dict() for c in self.plan.settings],
                   "qwt": [asdict(f) for f in self.plan.forms],
                   "args": {k: _plain(v) for k, v in sorted(vars(args).items())}, **self.session.details()}
        atomic_write(out / "details" / f"{self.stem}.json", json.dumps(details, indent=1, default=str) + "\n")
        if complete:
            title = self.task.title(args)
            record["notes"] = self.session.notes()
            text = results_table(self.rows, self.task.columns, title, record) + record["notes"]
            atomic_write(out / f"{self.stem}.md", text)
            results_chart(self.rows, self.task.columns[0], out / f"{self.stem}.png", title)
        atomic_write(out / f"{self.stem}.json", json.dumps(record, indent=1) + "\n")


def combine(out: Path, stems: Sequence[str], columns: Sequence[Column], title: str) -> str:
    """Put the complete records ``OUT/<stem>.json`` of several runs together (:func:`write_tables`); ``title`` may
    name the machine's fields (``{cpu_capability}``). Returns the markdown."""
    records = {stem: read_record(Path(out) / f"{stem}.json") for stem in stems}
    missing = [stem for stem, record in records.items() if record is None]
    if missing:
        raise InputError(f"{out}: no complete record of {', '.join(missing)}; run it first")
    summary = {"environment": {stem: r["environment"] for stem, r in records.items()},
               "data": {stem: r["data"] for stem, r in records.items()}}
    rows = [row for record in records.values() for row in record["rows"]]
    title = title.format(**next(iter(records.values()))["environment"])
    return write_tables(Path(out), rows, list(records.values()), columns, title, summary)


def write_tables(folder: Path, rows: list[Row], records: Sequence[dict[str, Any]], columns: Sequence[Column],
                 title: str, summary: dict[str, Any], comparison: str = "", footer: str = "") -> str:
    """Several runs' rows as one table: ``table.md`` (the title, a ``comparison`` with published numbers where
    there is one, a table per model on the first record's machine, each record's notes, a ``footer``),
    ``summary.json`` (``summary`` and the rows) and ``chart.png``. Returns the markdown."""
    head, _, body = results_table(rows, columns, title, {"environment": records[0]["environment"]}).partition("\n\n")
    text = f"{head}\n\n" + (f"{comparison}\n" if comparison else "") + body + record_notes(records) + footer
    atomic_write(folder / "summary.json", json.dumps({**summary, "rows": rows}, indent=2) + "\n")
    atomic_write(folder / "table.md", text)
    results_chart(rows, columns[0], folder / "chart.png", title)
    return text


def record_notes(records: Iterable[dict[str, Any]]) -> str:
    """The notes of each record (e.g. a language model's sample continuations), in order, once each."""
    return "".join(dict.fromkeys(r.get("notes") or "" for r in records))


def setting_name(config: PTQConfig) -> str:
    """``W4A4 gptq`` / ``W4A8 rtn (activations=tensor)``: the bits and the baseline as the rows name them."""
    baseline = config.resolved_baseline()
    return f"{config.tag} {baseline_label({'baseline': baseline.name, 'baseline_options': baseline.chosen_options()})}"


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def save_compensated(model: nn.Module, path: Path, builder: str, config: PTQConfig, build: dict[str, Any],
                     row: Row) -> None:
    """The usual :meth:`Session.save`: the library's saved format, with the row it was measured as."""
    save_quantized(model, path, builder, config, build, extra={"model": row["model"], "row": row})
