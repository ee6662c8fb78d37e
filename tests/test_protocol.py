"""The run protocol's promises, held to every task (classification ViT and ResNet, detection, the language model,
the main job): a run's record is rewritten after every row, so an interrupted run keeps its FP and PTQ rows and
a rerun completes it; a second run on the same --out either has nothing to do (same run, same configuration) or
is refused in one line (another configuration), and in both cases leaves every file as it was; a --config file's
values pass the checks of the flags themselves."""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qwt.cli import LOCK_FILE
from qwt.tasks import protocol


def _classification(kind: str) -> Callable[[], protocol.Task]:
    def make() -> protocol.Task:
        from qwt.tasks.classification import Classification

        return Classification(kind)

    return make


def _detection() -> protocol.Task:
    from qwt.tasks.detection.pipeline import Detection

    return Detection()


def _language_model() -> protocol.Task:
    from qwt.tasks.llm import LanguageModel

    return LanguageModel()


def _main_job() -> protocol.Task:
    from qwt.tasks.fashion_mnist import FashionMNIST

    return FashionMNIST()


def _few_fashion_mnist_images(mp: pytest.MonkeyPatch) -> None:
    """The main job on 2000 train and 256 test images: what is tested here does not depend on how many."""
    from qwt.tasks import fashion_mnist

    load = fashion_mnist.load_fashion_mnist
    mp.setattr(fashion_mnist, "load_fashion_mnist",
               lambda split, root=None: tuple(t[:2000 if split == "train" else 256] for t in load(split, root)))


_TOKENIZERS: dict[Any, Any] = {}


def _short_novels_one_tokenizer(mp: pytest.MonkeyPatch) -> None:
    """The language model on the first 20 000 characters of each novel (a few windows of 32 tokens are read),
    with its tokenizer loaded once for the whole module."""
    from qwt.tasks.llm import task, text

    read, load = text.read_austen, task.load_tokenizer
    mp.setattr(text, "read_austen", lambda novels: {n: t[:20000] for n, t in read(novels).items()})

    def load_once(model: Any) -> Any:
        if model not in _TOKENIZERS:
            _TOKENIZERS[model] = load(model)
        return _TOKENIZERS[model]

    mp.setattr(task, "load_tokenizer", load_once)


@dataclass(frozen=True)
class Spec:
    """A task's cheapest run, and a flag that changes its configuration but not its record's name."""

    task: Callable[[], protocol.Task]
    session: str  # module:class of its Session (whose evaluate an interrupted run breaks)
    argv: tuple[str, ...]
    change: tuple[str, ...]
    cheap: Callable[[pytest.MonkeyPatch], None] = field(default=lambda mp: None)


LM_TINY = ("--tiny-random", "--window", "32", "--calib-windows", "8", "--eval-windows", "4", "--ptq-windows", "2",
           "--bits", "W4A8", "--forms", "dense", "--guard-fraction", "0", "--continuation-tokens", "1")
TASKS = {
    "vit": Spec(_classification("vit"), "qwt.tasks.classification:ClassificationSession",
                ("--model", "deit_tiny", "--smoke", "--workers", "0", "--comp-images", "32"), ("--calib-images", "16")),
    "resnet": Spec(_classification("resnet"), "qwt.tasks.classification:ClassificationSession",
                   ("--model", "resnet18", "--smoke", "--workers", "0", "--comp-images", "32"), ("--seed", "1")),
    "detection": Spec(_detection, "qwt.tasks.detection.pipeline:DetectionSession",
                      ("--model", "mask_rcnn_swin_t", "--smoke", "--workers", "0"), ("--comp-images", "4")),
    "llm": Spec(_language_model, "qwt.tasks.llm.task:LanguageModelSession", LM_TINY, ("--ridge", "2"),
                _short_novels_one_tokenizer),
    "main-job": Spec(_main_job, "qwt.tasks.fashion_mnist:FashionMNISTSession",
                     ("--model", "vit_fmnist", "--bits", "W4A4", "--gptq-bits", "--calib-images", "8",
                      "--comp-images", "32"), ("--comp-images", "64"), _few_fashion_mnist_images),
}


class Interrupted(Exception):
    """Stands for a crash (out of memory, a killed job) in the middle of a run."""


def _session_class(spec: Spec) -> type:
    module, name = spec.session.split(":")
    return getattr(importlib.import_module(module), name)


def _interrupt_at_qwt(mp: pytest.MonkeyPatch, spec: Spec) -> None:
    cls = _session_class(spec)
    evaluate = cls.evaluate

    def evaluate_until_qwt(self, model, desc: str) -> dict[str, float]:
        if "QwT" in desc:
            raise Interrupted(desc)
        return evaluate(self, model, desc)

    mp.setattr(cls, "evaluate", evaluate_until_qwt)


@dataclass(frozen=True)
class Resumed:
    """One task's run interrupted at its QwT row, then run again on the same --out."""

    name: str
    task: protocol.Task
    argv: list[str]
    out: Path
    stem: str
    interrupted: dict[str, Any]  # the record on disk after the interruption
    interrupted_details: dict[str, Any]
    interrupted_files: list[str]
    code: int  # of the rerun


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="module", params=list(TASKS))
def resumed(request, tmp_path_factory) -> Resumed:
    spec, name = TASKS[request.param], request.param
    task, out = spec.task(), tmp_path_factory.mktemp(name) / "out"
    argv = [*spec.argv, "--no-progress", "--out", str(out)]
    stem = task.stem(protocol.parse_args(task, "", argv))
    with pytest.MonkeyPatch.context() as mp:
        spec.cheap(mp)
        _interrupt_at_qwt(mp, spec)
        with pytest.raises(Interrupted):
            protocol.run(task, protocol.parse_args(task, "", argv))
    interrupted = json.loads((out / f"{stem}.json").read_text())
    details = json.loads((out / "details" / f"{stem}.json").read_text())
    files = _files(out)
    with pytest.MonkeyPatch.context() as mp:
        spec.cheap(mp)
        code = protocol.main(task, "", argv)
    return Resumed(name, task, argv, out, stem, interrupted, details, files, code)


def test_an_interrupted_run_keeps_its_rows_and_a_rerun_completes_it(resumed):
    r = resumed
    assert r.interrupted["complete"] is False and r.interrupted["task"] == r.task.name
    assert [row["stage"] for row in r.interrupted["rows"]] == ["fp", "ptq"]
    assert r.interrupted_details["blocks"] == {}  # rewritten with the rows: no QwT row, no per-block reports
    assert f"{r.stem}.md" not in r.interrupted_files and f"{r.stem}.png" not in r.interrupted_files
    assert r.code == 0  # the incomplete record is run again, not refused, and the --out lock was released
    record = json.loads((r.out / f"{r.stem}.json").read_text())
    assert record["complete"] is True and [row["stage"] for row in record["rows"]] == ["fp", "ptq", "qwt"]
    metrics = [c.key for c in r.task.columns]
    for before, after in zip(r.interrupted["rows"], record["rows"]):  # the same seed: the same numbers again
        assert {k: before[k] for k in ("bits", "baseline", *metrics)} == {k: after[k] for k in ("bits", "baseline",
                                                                                              *metrics)}
    qwt = record["rows"][2]
    details = json.loads((r.out / "details" / f"{r.stem}.json").read_text())
    assert list(details["blocks"]) == [f"{qwt['bits']} {qwt['baseline']} dense"]
    assert len(details["blocks"][f"{qwt['bits']} {qwt['baseline']} dense"]) == qwt["blocks"] > 0
    assert (r.out / f"{r.stem}.md").is_file() and (r.out / f"{r.stem}.png").is_file()


def _snapshot(out: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file's bytes and modification time; the lock file only by name (it names its latest holder)."""
    return {name: None if name == LOCK_FILE else ((out / name).read_bytes(), (out / name).stat().st_mtime_ns)
            for name in _files(out)}


def _loads_nothing(monkeypatch: pytest.MonkeyPatch, task: protocol.Task) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("the run loaded its model and data")

    monkeypatch.setattr(task, "open", refuse)


def test_a_second_run_on_the_same_out_changes_nothing(resumed, monkeypatch, capsys):
    r = resumed
    before = _snapshot(r.out)
    assert f"{r.stem}.json" in before and LOCK_FILE in before
    _loads_nothing(monkeypatch, r.task)
    capsys.readouterr()
    assert protocol.main(r.task, "", [*r.argv, *TASKS[r.name].change]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --out {r.out} already holds a complete record of "
                                                         f"{r.stem} made with other settings"), err
    assert _snapshot(r.out) == before
    assert protocol.main(r.task, "", r.argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(r.out) == before


def _cli(task: protocol.Task, argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of the task's main.py (argparse's own refusals exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = protocol.main(task, "", argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("name,argv,setting,flags,problem", [
    ("detection", ["--model", "mask_rcnn_swin_t", "--smoke"], {"comp_images": 0}, ["--comp-images", "0"],
     "argument --comp-images"),
    ("llm", ["--tiny-random"], {"bits": ["W4A8-static"]}, ["--bits", "W4A8-static"],
     "--method-option activations=tensor"),
])
def test_a_config_file_value_passes_the_checks_of_its_flag(name, argv, setting, flags, problem, tmp_path,
                                                           monkeypatch, capsys):
    """(The command line wins over the file: ``argv`` does not give the flag itself.)"""
    task, out = TASKS[name].task(), tmp_path / "out"
    _loads_nothing(monkeypatch, task)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(setting))
    argv = [*argv, "--out", str(out)]
    code, err = _cli(task, [*argv, "--config", str(config)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and problem in err, err
    flag_code, flag_err = _cli(task, [*argv, *flags], capsys)
    assert flag_code == 2
    assert err.endswith(flag_err.splitlines()[-1].partition("error: ")[2])  # the very check of the flag
    assert not out.exists()
