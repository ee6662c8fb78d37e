"""Which annotated train2017 images QwT is fitted on, and in which order.

``seeded`` (default): the first ``count`` images of a permutation seeded with ``--seed``.

``authors``: the images the authors' detection code fits on under their documented launch
(``tools/dist_test.sh``, also with one GPU). There the compensation loader (``shuffle=True``, one image per batch)
gets mmdet 2.x's ``DistributedGroupSampler`` with seed 0 at epoch 0, and every rank stops after
``count / world_size`` images; the fit then sees the ranks' images gathered rank after rank. The sampler:

1. splits the dataset into aspect-ratio groups (group 1: width / height > 1, group 0: the rest);
2. draws, from one ``torch.Generator`` seeded with 0, a permutation of each non-empty group in group order, and
   pads each permuted group to a multiple of ``samples_per_gpu · world_size`` by repeating it from its start;
3. cuts the concatenated groups into chunks of ``samples_per_gpu`` and permutes the chunks with the same
   generator;
4. gives rank ``r`` the ``r``-th of ``world_size`` equal consecutive shares.

Everything here is index arithmetic on the group flags; the dataset glue is in :mod:`.coco`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import InputError

DRAWS = ("seeded", "authors")
#: The authors' sampler seed: their test script passes none, and the sampler turns None into 0.
AUTHORS_SEED = 0
#: Images per batch of the authors' compensation loader.
AUTHORS_SAMPLES_PER_GPU = 1


def aspect_groups(sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """mmdet 2.x's group flag of each image from its (width, height): 1 for landscape (w / h > 1), else 0."""
    return np.array([1 if width / height > 1 else 0 for width, height in sizes], dtype=np.int64)


def seeded_draw(size: int, count: int, seed: int) -> list[int]:
    """The first ``count`` of a permutation of ``range(size)`` drawn with ``seed``."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist()


def group_sampler_share(groups: np.ndarray, rank: int, world_size: int, samples_per_gpu: int = 1,
                        seed: int = AUTHORS_SEED) -> list[int]:
    """Rank ``rank``'s indices, in order, from mmdet 2.x's ``DistributedGroupSampler`` at epoch 0."""
    generator = torch.Generator().manual_seed(seed)
    multiple = samples_per_gpu * world_size
    padded = []
    for group in range(int(groups.max()) + 1 if groups.size else 0):
        members = np.flatnonzero(groups == group)
        if members.size == 0:
            continue
        shuffled = members[torch.randperm(members.size, generator=generator).numpy()]
        padded.append(np.resize(shuffled, math.ceil(members.size / multiple) * multiple))  # repeats cyclically
    order = np.concatenate(padded) if padded else np.zeros(0, dtype=np.int64)
    chunks = order.reshape(-1, samples_per_gpu)
    order = chunks[torch.randperm(len(chunks), generator=generator).numpy()].reshape(-1)
    share = len(order) // world_size
    return order[rank * share:(rank + 1) * share].tolist()


def authors_draw(groups: np.ndarray, count: int, world_size: int) -> list[int]:
    """The authors' ``count`` compensation images under ``world_size`` processes, in the order their fit sees
    them: the first ``count / world_size`` of rank 0's share, then of rank 1's, and so on."""
    if count % world_size:
        raise InputError(f"--comp-images {count} is not a multiple of --world-size {world_size}: each of the "
                         "authors' processes takes comp_images / world_size images; pick a multiple")
    per_rank = count // world_size
    return [index for rank in range(world_size)
            for index in group_sampler_share(groups, rank, world_size, AUTHORS_SAMPLES_PER_GPU)[:per_rank]]

