"""The language model's text: calibration and evaluation windows from Jane Austen's novels (the default), the
user's files, or WikiText-2 with its standard protocol. Text is tokenised without special tokens."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ...data.text import (CALIBRATION_NOVELS, EVALUATION_NOVELS, read_austen, read_text_files, read_wikitext2,
                          token_windows)
from ...errors import InputError


def tokens(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def load_windows(args: argparse.Namespace, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration windows, evaluation windows, what was used). Text is tokenised without special tokens."""
    if args.wikitext2 is not None:
        calib_text, eval_text = read_wikitext2(args.wikitext2, "train"), read_wikitext2(args.wikitext2, "test")
        data = {"source": "wikitext2", "dir": str(args.wikitext2), "calibration": "train", "evaluation": "test"}
    elif args.eval_text:
        calib_text = read_text_files(args.calib_text, "--calib-text")
        eval_text = read_text_files(args.eval_text, "--eval-text")
        data = {"source": "files", "calibration": [str(p) for p in args.calib_text],
                "evaluation": [str(p) for p in args.eval_text]}
    else:
        novels = read_austen(CALIBRATION_NOVELS + EVALUATION_NOVELS)
        calib_text = "\n\n".join(novels[n] for n in CALIBRATION_NOVELS)
        eval_text = "\n\n".join(novels[n] for n in EVALUATION_NOVELS)
        data = {"source": "janeaustenr", "calibration": list(CALIBRATION_NOVELS),
                "evaluation": list(EVALUATION_NOVELS)}
    calib_ids, eval_ids = tokens(tokenizer, calib_text), tokens(tokenizer, eval_text)
    calib = token_windows(calib_ids, args.window, args.calib_windows, "calibration")
    evaluation = token_windows(eval_ids, args.window, args.eval_windows, "evaluation")
    data.update({"window": args.window, "calibration_tokens": calib_ids.numel(), "evaluation_tokens": eval_ids.numel(),
                 "calibration_windows": calib.shape[0], "evaluation_windows": evaluation.shape[0],
                 "windows_spread_evenly": True, "special_tokens": False})
    return calib, evaluation, data


def check_text(args: argparse.Namespace) -> None:
    """The text flags, before any model is loaded."""
    for path in (args.calib_text or []) + (args.eval_text or []):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such text file")
    if args.wikitext2 is not None:
        if args.calib_text or args.eval_text:
            raise InputError("--wikitext2 and --calib-text/--eval-text each name the text to use; pass one of them")
        if not Path(args.wikitext2).is_dir():
            raise InputError(f"--wikitext2 {args.wikitext2}: not a folder")
    if args.eval_text and not args.calib_text:
        raise InputError("--eval-text needs --calib-text (calibration must not see the evaluation text)")
    if args.calib_text and not args.eval_text:
        raise InputError("--calib-text needs --eval-text")
