"""Where QwT's block features wait between blocks: on a device, or in files on disk.

QwT walks the blocks in order, and each block's fit needs its input for every compensation image, so the
features of all images are held at one block boundary (and the block's outputs beside them while it is fitted).
On a device they take memory that grows with the image count; ``"cpu"`` moves them off a GPU, and ``"disk"``
moves them out of the process: each batch is a raw file in a temporary directory, read back when its turn comes,
so resident memory holds one batch per boundary whatever the image count (the kernel's page cache may still
keep the files in otherwise free memory; it gives that memory back when it is needed).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

DISK = "disk"


class FeatureStore:
    """One slot per batch; :meth:`put` stores a tensor there, :meth:`get` returns it on the compute device."""

    def __init__(self, where: str | torch.device | None, directory: Path | None = None) -> None:
        """``where``: a device, ``"disk"`` (files in ``directory``), or None (each batch stays where it is)."""
        self.where, self.on_disk = where, where == DISK
        self.device = None if self.on_disk or where is None else torch.device(where)
        self.directory = directory
        self._slots: list[torch.Tensor | tuple[Path, torch.Size, torch.dtype] | None] = []

    def __len__(self) -> int:
        return len(self._slots)

    def put(self, k: int, x: torch.Tensor) -> None:
        """Store ``x`` as batch ``k`` (appended when ``k == len(self)``), replacing what was there."""
        if k == len(self._slots):
            self._slots.append(None)
        self._slots[k] = None  # the old batch is freed before the new one is written
        if not self.on_disk:
            self._slots[k] = x if self.device is None else x.to(self.device)
            return
        path = self.directory / f"{id(self)}-{k}.bin"
        x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)
        self._slots[k] = (path, x.shape, x.dtype)

    def get(self, k: int, device: torch.device) -> torch.Tensor:
        slot = self._slots[k]
        if slot is None:
            raise KeyError(f"feature batch {k} was released")
        if not self.on_disk:
            return slot.to(device)
        path, shape, dtype = slot
        mapped = torch.from_file(str(path), shared=False, size=shape.numel(), dtype=dtype).reshape(shape)
        # A private copy: the mapping is dropped at once, so the file can be replaced while the copy is in use.
        return mapped.to(device, copy=True)

    def release(self, k: int) -> None:
        slot, self._slots[k] = self._slots[k], None
        if self.on_disk and slot is not None:
            slot[0].unlink()

    def clear(self) -> None:
        for k in range(len(self._slots)):
            self.release(k)

    def sibling(self) -> FeatureStore:
        """An empty store of the same kind (e.g. for a block's outputs while its inputs are still needed)."""
        return FeatureStore(self.where, self.directory)


class FeatureStores:
    """Makes :class:`FeatureStore` s for one QwT run; a ``"disk"`` run's files live in a temporary directory
    that is removed on exit, also when the run fails."""

    def __init__(self, where: str | torch.device | None) -> None:
        self.where = where
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> FeatureStores:
        if self.where == DISK:
            self._tmp = tempfile.TemporaryDirectory(prefix="qwt-features-")
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def new(self) -> FeatureStore:
        return FeatureStore(self.where, Path(self._tmp.name) if self._tmp else None)
