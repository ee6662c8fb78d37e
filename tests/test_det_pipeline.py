"""Detection data, COCO evaluation and the end-to-end smoke run (synthetic COCO written by the tests)."""
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from qwt.tasks.detection.coco import coco_dataset, compensation_images, compensation_set, evaluate, loader
from qwt.tasks.detection.configs import build_detector
from qwt.tasks.detection.synthetic import CLASSES, write_coco


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"), train=6, val=3)


class _Oracle(torch.nn.Module):
    """Predicts the ground truth of each image (optionally shifted), to check the metric glue end to end."""

    def __init__(self, ann_file: Path, shift: float = 0.0) -> None:
        super().__init__()
        from pycocotools.coco import COCO

        self.coco, self.shift = COCO(str(ann_file)), shift
        self.label = {cat: i for i, cat in enumerate(self.coco.getCatIds(catNms=list(CLASSES)))}

    def test_step(self, batch: dict) -> list:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        out = []
        for sample in batch["data_samples"]:
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=sample.img_id))
            boxes = torch.tensor([[x + self.shift, y, x + w + self.shift, y + h] for x, y, w, h in
                                  (a["bbox"] for a in anns)])
            pred = InstanceData(bboxes=boxes, scores=torch.ones(len(anns)),
                                labels=torch.tensor([self.label[a["category_id"]] for a in anns]),
                                masks=torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])).bool().roll(
                                    int(self.shift), dims=-1))
            result = DetDataSample(metainfo=sample.metainfo)
            result.pred_instances = pred
            out.append(result)
        return out


def test_synthetic_coco_is_valid(coco):
    from pycocotools.coco import COCO

    for split, count in (("train2017", 6), ("val2017", 3)):
        api = COCO(str(coco / "annotations" / f"instances_{split}.json"))
        assert len(api.getImgIds()) == count and len(list((coco / split).glob("*.jpg"))) == count
        for ann in api.loadAnns(api.getAnnIds()):
            mask_area = api.annToMask(ann).sum()
            assert ann["bbox"][2] >= 24 and ann["bbox"][3] >= 24
            assert abs(mask_area - ann["area"]) / ann["area"] < 0.15  # polygon, mask and area agree


def test_coco_evaluation_scores_perfect_and_wrong_predictions(coco):
    data = loader(coco_dataset(coco, "val2017", (320, 256), classes=CLASSES), 1, 0)
    ann_file = coco / "annotations" / "instances_val2017.json"
    assert evaluate(_Oracle(ann_file), data, progress=False) == (100.0, 100.0)
    box, mask = evaluate(_Oracle(ann_file, shift=12.0), data, progress=False)
    assert box < 60.0 and mask < 60.0


def test_compensation_images_are_a_seeded_224_draw(coco):
    model = build_detector("mask_rcnn_swin_t", smoke=True, num_classes=2)

    def draw(seed: int) -> torch.Tensor:
        images = compensation_set(coco, 4, 224, "seeded", seed, classes=CLASSES)
        return torch.cat(list(compensation_images(model, images, 3, 0)))

    first = draw(0)
    assert first.shape == (4, 3, 224, 224)
    assert abs(float(first.mean())) < 1.5  # normalised, not raw 0..255 pixels
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))
    with pytest.raises(ValueError, match="exceeds"):
        compensation_set(coco, 7, 224, "seeded", 0, classes=CLASSES)


def test_compensation_draws_stay_the_same_across_many_draws_in_one_process(coco, monkeypatch):
    """mmengine 0.10's ``get_subset`` deep-copies through a memo shared by every call in the process; once a freed
    dataset's id is reused, a "copy" is a stale object from an earlier draw (seen: a CocoDataset called as a
    transform). The draw must not go through it, and many draws with ids recycled in between must agree."""
    import gc

    from mmengine.dataset import BaseDataset

    def refuse(*args, **kwargs):
        raise AssertionError("the compensation draw went through BaseDataset's shared deep-copy memo")

    monkeypatch.setattr(BaseDataset, "get_subset", refuse)
    monkeypatch.setattr(BaseDataset, "_copy_without_annotation", refuse)
    first: dict[int, list[torch.Tensor]] = {}
    for k in range(16):
        seed = k % 2
        drawn = compensation_set(coco, 2, 224, "seeded", seed, classes=CLASSES)
        pixels = [drawn[i]["inputs"] for i in range(len(drawn))]
        assert all(p.shape[-2:] == (224, 224) for p in pixels)
        expected = first.setdefault(seed, pixels)
        assert all(torch.equal(a, b) for a, b in zip(pixels, expected)), f"draw {k} (seed {seed}) changed"
        del drawn, pixels
        gc.collect()
    assert not all(torch.equal(a, b) for a, b in zip(first[0], first[1]))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "common"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_main_reports_missing_inputs(tmp_path):
    result = _run(sys.executable, "QwT-det-RepQ-ViT/main.py", "--model", "mask_rcnn_swin_t", "--coco-root",
                  str(tmp_path), "--checkpoint", str(tmp_path / "none.pth"))
    assert result.returncode == 2 and "none.pth not found" in result.stderr


def test_det_swin_smoke_end_to_end(tmp_path):
    """scripts/det_swin.sh --smoke: both detector types, W4A4 and W6A6, calibration → QwT → COCO eval → table."""
    out = tmp_path / "det"
    result = _run("bash", "scripts/det_swin.sh", "--smoke", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert summary["missing"] == [] and summary["environment"][0]["device"] == "cpu"
    assert summary["environment"][0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    models = {"mask_rcnn_swin_t-smoke", "cascade_mask_rcnn_swin_t-smoke"}
    assert {r["model"] for r in rows} == models
    for model in models:
        mine = [(r["bits"], r["stage"]) for r in rows if r["model"] == model]
        assert sorted(mine) == sorted([("FP", "fp"), ("W4A4", "ptq"), ("W4A4", "qwt"), ("W6A6", "ptq"),
                                       ("W6A6", "qwt")])
    common = {"model", "bits", "baseline", "stage", "form", "box_ap", "mask_ap", "size_mb", "peak_memory_mb"}
    for r in rows:
        extra = {"fp": set(), "ptq": {"ptq_seconds"}, "qwt": {"ptq_seconds", "qwt_seconds", "blocks_kept", "blocks"}}
        assert set(r) == common | extra[r["stage"]]
        assert 0.0 <= r["box_ap"] <= 100.0 and 0.0 <= r["mask_ap"] <= 100.0
        assert r["baseline"] == (None if r["stage"] == "fp" else "repq_vit")
        assert r["form"] == ("dense" if r["stage"] == "qwt" else None)
        if r["stage"] == "qwt":
            ptq = next(p for p in rows if (p["model"], p["bits"], p["stage"]) == (r["model"], r["bits"], "ptq"))
            assert r["ptq_seconds"] == ptq["ptq_seconds"] > 0.0  # the baseline the QwT row was fitted on
            assert math.isfinite(r["qwt_seconds"]) and r["qwt_seconds"] > 0.0
            assert r["blocks"] == 8 and 0 < r["blocks_kept"] <= 8
    record = json.loads((out / "cascade_mask_rcnn_swin_t-smoke_W4A4.json").read_text())
    assert record["complete"] and record["data"]["mmdet"] == importlib.metadata.version("mmdet")  # detector library
    details = json.loads((out / "details" / "cascade_mask_rcnn_swin_t-smoke_W4A4.json").read_text())
    blocks = details["blocks"]["W4A4 repq_vit dense"]
    assert [b["path"] for b in blocks] == [f"backbone.stages.{s}.blocks.{j}" for s in range(4) for j in range(2)]
    assert any(b["applied"] for b in blocks) and details["qwt"][0]["fp16_eval"] is False
    assert details["qwt"][0]["solver"] == "reference"  # the table's rows sit next to the paper: the authors' solver
    table = (out / "table.md").read_text()
    assert table.count("| cascade_mask_rcnn_swin_t-smoke |") == 5 and "PTQ+QwT" in table


def parse(*argv: str, description: str = "t"):
    """Detection flags as QwT-det-RepQ-ViT/main.py parses them."""
    from qwt.tasks import protocol
    from qwt.tasks.detection.pipeline import Detection

    return protocol.parse_args(Detection(), description, list(argv))


def test_defaults_follow_the_authors_detection_code():
    from qwt.tasks.detection.configs import detector_config

    args = parse("--model", "mask_rcnn_swin_t")
    assert args.log_floor is None  # their detection quantiser has no log floor
    for name in ("mask_rcnn_swin_t", "cascade_mask_rcnn_swin_t"):
        assert detector_config(name)["test_cfg"]["rpn"]["min_bbox_size"] == -1  # mmdet 2.x: no size filter


class _Blind(torch.nn.Module):
    """Detects nothing on any image."""

    def test_step(self, batch: dict) -> list:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        out = []
        for sample in batch["data_samples"]:
            result = DetDataSample(metainfo=sample.metainfo)
            result.pred_instances = InstanceData(bboxes=torch.zeros(0, 4), scores=torch.zeros(0),
                                                 labels=torch.zeros(0, dtype=torch.long),
                                                 masks=torch.zeros(0, 256, 320, dtype=torch.bool))
            out.append(result)
        return out


def test_no_detection_at_all_is_ap_zero_with_a_warning(coco):
    # Before: mmdet's metric returned no value and the run crashed with a KeyError after the FP and PTQ rows.
    data = loader(coco_dataset(coco, "val2017", (320, 256), classes=CLASSES), 1, 0)
    with pytest.warns(RuntimeWarning, match="no detections"):
        assert evaluate(_Blind(), data, progress=False) == (0.0, 0.0)


def test_subset_runs_are_labelled_and_inputs_checked_first(tmp_path):
    from qwt.tasks import protocol
    from qwt.tasks.detection.pipeline import Detection, run_label

    args = parse("--model", "mask_rcnn_swin_t", "--smoke", "--val-limit", "2")
    assert run_label(args) == "mask_rcnn_swin_t-smoke-val2" and Detection().stem(args).endswith("-val2_W4A4")
    (tmp_path / "file").write_text("")
    result = _run(sys.executable, "QwT-det-RepQ-ViT/main.py", "--model", "mask_rcnn_swin_t", "--coco-root",
                  str(tmp_path), "--checkpoint", str(tmp_path))
    assert result.returncode == 2 and "is a directory" in result.stderr and "Traceback" not in result.stderr
    for flags, message in ((["--out", str(tmp_path / "file" / "x")], "is not a folder"),
                           (["--start-block", "99"], "past the last block"),
                           (["--device", "cuda:7"], "--device cuda:7")):
        with pytest.raises(ValueError, match=message):
            protocol.run(Detection(), parse("--model", "mask_rcnn_swin_t", "--smoke", *flags))


def test_every_coco_split_is_checked_before_any_work(tmp_path):
    """A COCO root without train2017 (compensation images) is refused in one line before the detector is built,
    not after the FP and PTQ evaluations of val2017."""
    root = tmp_path / "coco"
    write_coco(root, train=2, val=2)
    (root / "annotations" / "instances_train2017.json").unlink()
    (root / "train2017").rename(tmp_path / "elsewhere")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # never read: the data check comes first
    out = tmp_path / "out"
    result = _run(sys.executable, "QwT-det-RepQ-ViT/main.py", "--model", "mask_rcnn_swin_t", "--coco-root", str(root),
                  "--checkpoint", str(weights), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: COCO under --coco-root")
    assert "instances_train2017.json" in lines[0] and f"{root / 'train2017'}/" in lines[0]
    assert "val2017" not in lines[0]  # only what is missing is named
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--comp-images", "9"], "exceeds the 8 annotated"),
    (["--comp-draw", "authors", "--world-size", "3"], "not a multiple of --world-size 3"),
    (["--world-size", "2"], "only applies to --comp-draw authors"),
])
def test_the_compensation_draw_is_checked_before_the_first_evaluation(flags, message, monkeypatch):
    from qwt.tasks import protocol
    from qwt.tasks.detection import pipeline

    def no_evaluation(*args, **kwargs):
        raise AssertionError("an evaluation ran before the input error")

    monkeypatch.setattr(pipeline, "evaluate", no_evaluation)
    args = parse("--model", "mask_rcnn_swin_t", "--smoke", "--workers", "0", *flags)
    with pytest.raises(ValueError, match=message):
        protocol.run(pipeline.Detection(), args)


def test_help_lists_only_detection_flags_and_keeps_the_examples():
    from qwt.tasks import protocol
    from qwt.tasks.cli import CNN_DEFAULTS
    from qwt.tasks.detection.pipeline import Detection

    description = "first line\n\nexamples:\n  python main.py --model m \\\n      --smoke"
    text = protocol.build_parser(Detection(), description).format_help()
    assert description in text  # not reflowed into one paragraph
    for flag in ("--conv-act-bits", "--kernel-size", "--channels-per-group", "--factor"):
        assert flag not in text  # CNN-only flags
    assert "--method " in text and "--method-option" in text  # the baseline axis is every task's
    for group in ("detector and data:", "quantisation (PTQ):", "compensation (QwT):", "compensation images"):
        assert group in text
    assert "--comp-draw" in text and "--world-size" in text and "(default: repq_vit)" in text
    args = parse("--model", "mask_rcnn_swin_t")
    assert {k: getattr(args, k) for k in CNN_DEFAULTS} == CNN_DEFAULTS  # configs built as before
