"""Fashion-MNIST reader for the IDX files shipped by the Debian package ``dataset-fashion-mnist``.

The files are parsed directly with numpy (no torchvision download logic), so the data
comes from a fixed local path and never from the network.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEFAULT_ROOT", "CLASSES", "MEAN", "STD", "load_fashion_mnist", "normalize"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean / std of pixel/255 over the 60k train images (computed from the files, 4 decimals).
MEAN = 0.2860
STD = 0.3530

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dims
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dim


def _resolve(root: Path, stem: str) -> Path:
    """Prefer the gzip'd file as packaged, but accept an un-gzipped copy too."""
    gz = root / f"{stem}.gz"
    if gz.is_file():
        return gz
    raw = root / stem
    if raw.is_file():
        return raw
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {gz} (nor {raw}). "
        "Install it with `apt-get install dataset-fashion-mnist` (Debian package) "
        "or pass root= pointing at a directory holding the IDX files."
    )


def _read_bytes(path: Path) -> bytes:
    """Read the whole file, decompressing when it is gzip'd; corrupt gzip becomes ValueError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read file ({e})") from e


def _parse_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file, checking the magic number, dims and payload length."""
    data = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes, need {header_len})")
    got_magic = int.from_bytes(data[0:4], "big")
    if got_magic != magic:
        raise ValueError(f"{path}: bad magic number 0x{got_magic:08x}, expected 0x{magic:08x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_len
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(f"{path}: file {kind}: {payload} data bytes for dims {dims} (expected {expected})")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,) for ``split`` in {"train", "test"}."""
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    base = DEFAULT_ROOT if root is None else Path(root)
    prefix = _PREFIX[split]
    img_path = _resolve(base, f"{prefix}-images-idx3-ubyte")
    lbl_path = _resolve(base, f"{prefix}-labels-idx1-ubyte")

    images = _parse_idx(img_path, _IMAGE_MAGIC, 3)
    labels = _parse_idx(lbl_path, _LABEL_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected 28x28 images, got {images.shape[1:]}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{lbl_path}: label count {labels.shape[0]} != image count {images.shape[0]} in {img_path}"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{lbl_path}: label value {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    # copy(): frombuffer arrays are read-only, torch wants writable memory.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 (N, 28, 28) to float (N, 1, 28, 28) standardized with the train-split MEAN/STD."""
    x = images_uint8.to(torch.float32).div(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x - MEAN) / STD
