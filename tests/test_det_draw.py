"""The detection compensation draw: the authors' sampler order (mmdet 2.x ``DistributedGroupSampler``) against a
plain re-statement of that sampler, and the glue that reads the aspect-ratio groups from a COCO annotation file."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qwt.errors import InputError
from qwt.tasks.detection.draw import aspect_groups, authors_draw, group_sampler_share, seeded_draw


def _restated_sampler(flag: list[int], samples_per_gpu: int, num_replicas: int, rank: int, seed: int = 0) -> list[int]:
    """mmdet 2.x ``DistributedGroupSampler.__iter__`` at epoch 0, re-stated step by step with Python lists."""
    g = torch.Generator()
    g.manual_seed(0 + seed)  # epoch + seed
    group_sizes = np.bincount(np.array(flag, dtype=np.uint8))
    num_samples = sum(int(math.ceil(size * 1.0 / samples_per_gpu / num_replicas)) * samples_per_gpu
                      for size in group_sizes)
    indices: list[int] = []
    for i, size in enumerate(group_sizes):
        if size == 0:
            continue
        members = [k for k, f in enumerate(flag) if f == i]
        perm = torch.randperm(int(size), generator=g).tolist()
        members = [members[p] for p in perm]
        extra = int(math.ceil(size * 1.0 / samples_per_gpu / num_replicas)) * samples_per_gpu * num_replicas - size
        padded = list(members)
        for _ in range(extra // size):
            padded.extend(members)
        padded.extend(members[:extra % size])
        indices.extend(padded)
    assert len(indices) == num_samples * num_replicas
    chunk_order = torch.randperm(len(indices) // samples_per_gpu, generator=g).tolist()
    indices = [indices[j] for c in chunk_order for j in range(c * samples_per_gpu, (c + 1) * samples_per_gpu)]
    offset = num_samples * rank
    return indices[offset:offset + num_samples]


def _sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """Image sizes of both orientations, and squares (which are group 0)."""
    rng = np.random.default_rng(seed)
    sizes = [(int(w), int(h)) for w, h in rng.integers(40, 641, size=(count, 2))]
    return sizes + [(300, 300), (480, 640), (640, 480)]


def test_aspect_groups_are_mmdet2_flags():
    assert aspect_groups([(640, 480), (480, 640), (500, 500), (501, 500)]).tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize("world_size", [1, 8])
@pytest.mark.parametrize("samples_per_gpu", [1, 2])
@pytest.mark.parametrize("count", [37, 203])
def test_group_sampler_matches_the_restated_mmdet2_sampler(world_size, samples_per_gpu, count):
    flag = aspect_groups(_sizes(count, seed=count))
    assert 0 < flag.sum() < len(flag)  # both groups present
    shares = [group_sampler_share(flag, r, world_size, samples_per_gpu) for r in range(world_size)]
    for rank, share in enumerate(shares):
        assert share == _restated_sampler(flag.tolist(), samples_per_gpu, world_size, rank)
    seen = [i for share in shares for i in share]
    assert set(seen) == set(range(len(flag)))  # every image is somewhere; padding only repeats
    if world_size == 1 and samples_per_gpu == 1:
        assert sorted(seen) == list(range(len(flag)))  # one process, one image per batch: a permutation


def test_group_sampler_with_one_group_only():
    flag = aspect_groups([(200, 100)] * 11)  # group 0 empty
    for rank in range(3):
        assert group_sampler_share(flag, rank, 3) == _restated_sampler(flag.tolist(), 1, 3, rank)


@pytest.mark.parametrize("world_size", [1, 8])
def test_authors_draw_takes_count_over_n_from_each_rank_in_rank_order(world_size):
    flag = aspect_groups(_sizes(300, seed=1))
    count = 64
    draw = authors_draw(flag, count, world_size)
    per_rank = count // world_size
    expected = [i for r in range(world_size) for i in _restated_sampler(flag.tolist(), 1, world_size, r)[:per_rank]]
    assert draw == expected and len(draw) == count
    assert draw != seeded_draw(len(flag), count, 0)  # a different order from the seeded default


def test_authors_draw_differs_between_world_sizes_and_refuses_an_uneven_split():
    flag = aspect_groups(_sizes(300, seed=2))
    assert authors_draw(flag, 64, 1) != authors_draw(flag, 64, 8)
    with pytest.raises(InputError, match="not a multiple of --world-size 3"):
        authors_draw(flag, 64, 3)


def _mixed_coco(root: Path) -> Path:
    """A synthetic COCO whose train2017 annotations give both orientations, a square, a too-small image and an
    image without annotations (the images on disk keep one size: only the annotation file decides the draw)."""
    from qwt.tasks.detection.synthetic import write_coco

    write_coco(root, train=12, val=2)
    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    shapes = [(160, 128), (128, 160), (150, 150), (200, 120), (120, 200), (300, 100), (100, 300), (31, 200),
              (180, 130), (130, 180), (160, 128), (128, 160)]
    for image, (w, h) in zip(data["images"], shapes):
        image["width"], image["height"] = w, h
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != data["images"][3]["id"]]
    ann.write_text(json.dumps(data))
    return root


def test_compensation_set_reads_groups_from_the_annotations(tmp_path):
    from qwt.tasks.detection.coco import compensation_set
    from qwt.tasks.detection.synthetic import CLASSES

    root = _mixed_coco(tmp_path / "coco")
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"]}
    kept = [im for im in data["images"] if im["id"] in annotated and min(im["width"], im["height"]) >= 32]
    flag = [1 if im["width"] / im["height"] > 1 else 0 for im in kept]
    assert len(kept) == 10 and 0 < sum(flag) < len(flag)
    for world_size in (1, 2):
        subset = compensation_set(root, 6, 224, "authors", seed=5, world_size=world_size, classes=CLASSES)
        ids = [subset.get_data_info(i)["img_id"] for i in range(len(subset))]
        expected = [kept[i]["id"] for r in range(world_size)
                    for i in _restated_sampler(flag, 1, world_size, r)[:6 // world_size]]
        assert ids == expected
