"""Text for language models: the Jane Austen corpus split by novel, user text files, WikiText-2, and windows.

The corpus is Debian's ``r-cran-janeaustenr`` (six novels, about 1.0 M SmolLM2 tokens), unpacked by
``scripts/fetch_austen.sh``; its texts sit in an R lazy-load database (``data/Rdata.rdx`` indexes zlib chunks
of ``data/Rdata.rdb``), read with the ``rdata`` package. The split is by novel, fixed and disjoint: QwT and PTQ
calibrate on four novels, perplexity is measured on the other two, so no evaluation sentence is ever seen during
calibration.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import torch

from ..errors import InputError

#: Calibration novels (published 1811–1815) and evaluation novels (Northanger Abbey and Persuasion, the two
#: shortest, published together in 1817). Keys are the janeaustenr variable names.
CALIBRATION_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma")
EVALUATION_NOVELS = ("northangerabbey", "persuasion")


def _data_roots() -> list[Path]:
    roots = [Path(os.environ["QWT_DATA"])] if os.environ.get("QWT_DATA") else []
    roots += [Path("/usr/local/share/qwt-data"), Path.home() / ".cache" / "qwt-data"]
    return [r / "janeaustenr" for r in roots] + [Path("/usr/lib/R/site-library/janeaustenr")]


def austen_dir() -> Path:
    """The janeaustenr package folder, or an error naming where it was looked for and how to fetch it."""
    for root in _data_roots():
        if (root / "data" / "Rdata.rdb").is_file() and (root / "data" / "Rdata.rdx").is_file():
            return root
    raise InputError("the Jane Austen corpus was not found (looked in "
                     f"{', '.join(str(r) for r in _data_roots())}); run `bash scripts/fetch_austen.sh` "
                     "(or scripts/install.sh), or pass your own text with --calib-text/--eval-text")


def _parse_r(data: bytes):
    import rdata

    with warnings.catch_warnings():  # rdata warns that a bare serialisation has no file extension it knows
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_austen(novels: tuple[str, ...]) -> dict[str, str]:
    """Each novel's text: its lines joined with newlines (empty lines mark paragraphs), in the order asked."""
    root = austen_dir() / "data"
    index = _parse_r(zlib.decompress((root / "Rdata.rdx").read_bytes(), 15 + 32))["variables"]
    index = {str(k): v for k, v in index.items()}
    unknown = [n for n in novels if n not in index]
    if unknown:
        raise InputError(f"unknown novel(s) {', '.join(unknown)}; the corpus has {', '.join(sorted(index))}")
    out = {}
    with open(root / "Rdata.rdb", "rb") as f:
        for name in novels:
            offset, length = (int(v) for v in index[name])
            f.seek(offset)
            chunk = f.read(length)
            size = struct.unpack(">i", chunk[:4])[0]
            data = zlib.decompress(chunk[4:])
            if len(data) != size:
                raise InputError(f"{root / 'Rdata.rdb'}: {name} is damaged (size {len(data)}, expected {size})")
            out[name] = "\n".join(str(line) for line in _parse_r(data))
    return out


def read_text_files(paths: list[Path], flag: str) -> str:
    """User text: the files' contents joined by blank lines (UTF-8)."""
    parts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{flag} {path}: no such file")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise InputError(f"{flag} {path}: not UTF-8 text ({err})") from None
    return "\n\n".join(parts)


def read_wikitext2(directory: Path, split: str) -> str:
    """WikiText-2 (raw) as the standard protocol uses it: a split's lines concatenated with blank lines between
    them (``"\\n\\n".join``). Accepts the ``wiki.{train,test}.raw`` files or the Hugging Face parquet export."""
    directory = Path(directory)
    raw = directory / f"wiki.{split}.raw"
    if raw.is_file():
        return raw.read_text(encoding="utf-8")
    parquet = sorted(directory.rglob(f"{split}-*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        return "\n\n".join(pq.read_table(parquet[0])["text"].to_pylist())
    raise InputError(f"--wikitext2 {directory}: neither wiki.{split}.raw nor {split}-*.parquet found there")


def token_windows(ids: torch.Tensor, window: int, limit: int | None, what: str) -> torch.Tensor:
    """Non-overlapping windows of ``window`` tokens, (N, window); with ``limit``, that many spread evenly over
    the text (deterministic). A text shorter than one window is refused."""
    n = ids.numel() // window
    if n == 0:
        raise InputError(f"the {what} text has {ids.numel()} tokens, fewer than one window of {window}: "
                         "give more text or a smaller --window")
    windows = ids[: n * window].reshape(n, window)
    if limit is not None and limit < n:
        pick = torch.div(torch.arange(limit) * n, limit, rounding_mode="floor")
        windows = windows[pick]
    return windows.contiguous()
