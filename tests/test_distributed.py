"""torch.distributed: statistics all-reduced across ranks give the single-process solution (gloo, 2 CPU ranks)."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qwt
from qwt.compensation import GroupedConvLeastSquares, LinearLeastSquares


def _data():
    gen = torch.Generator().manual_seed(3)
    x, xc = torch.randn(8, 20, 6, generator=gen), torch.randn(8, 4, 5, 5, generator=gen)
    return x, torch.tanh(x @ torch.randn(6, 6, generator=gen)), xc, torch.randn(8, 4, 5, 5, generator=gen)


def _fits():
    return LinearLeastSquares(), GroupedConvLeastSquares(4, 4, 3, 1, 2)


def _vit_setup():
    torch.manual_seed(0)
    fp = qwt.create_model("swin_tiny", smoke=True, num_classes=4)
    gen = torch.Generator().manual_seed(3)
    calib, comp = torch.randn(8, 3, 32, 32, generator=gen), torch.randn(64, 3, 32, 32, generator=gen)
    return qwt.quantize(copy.deepcopy(fp), calib, qwt.PTQConfig()), comp


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, t, xc, tc = (d.chunk(world)[rank] for d in _data())
    linear, conv = _fits()
    linear.update(x, t)
    conv.update(xc, tc)
    linear.reduce()
    conv.reduce()
    model, comp = _vit_setup()
    share = comp.shape[0] // world
    reports = qwt.apply_qwt(model, comp[rank * share:(rank + 1) * share], batch_size=8, progress=False)
    if rank == 0:
        torch.save({"linear": linear.solve().__dict__, "conv": conv.solve().__dict__, "r2_block0": reports[0].r2},
                   out)
    dist.destroy_process_group()


def _run_two_ranks(worker, out: str) -> dict:
    """Spawn ``worker(rank, 2, port, out)`` on two gloo ranks; returns what rank 0 saved to ``out``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_two_ranks_solve_the_single_process_system(tmp_path):
    got = _run_two_ranks(_worker, str(tmp_path / "rank0.pt"))
    x, t, xc, tc = _data()
    linear, conv = _fits()
    linear.update(x, t)
    conv.update(xc, tc)
    for name, fit in (("linear", linear), ("conv", conv)):
        ref = fit.solve()
        assert torch.allclose(got[name]["weight"], ref.weight, atol=1e-5)
        assert torch.allclose(got[name]["bias"], ref.bias, atol=1e-5)
        assert abs(got[name]["r2"] - ref.r2) < 1e-9
    # Through apply_qwt: the first block sees identical features on both sides, so its R² must agree.
    model, comp = _vit_setup()
    reports = qwt.apply_qwt(model, comp, batch_size=8, progress=False)
    assert abs(reports[0].r2 - got["r2_block0"]) < 1e-5  # FP32 features, sums in another order


def test_torchrun_task_equals_single_process(tmp_path):
    """The whole ViT task under torchrun (2 gloo ranks) gives the single-process per-block R² and top-1."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    main = Path(__file__).resolve().parent.parent / "QwT-cls-RepQ-ViT" / "main.py"
    common = ["--model", "deit_tiny", "--smoke", "--workers", "0", "--comp-images", "64", "--no-progress",
              "--device", "cpu", "--skip-fp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("multi", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
                           ("single", [sys.executable])):
        subprocess.run([*launcher, str(main), *common, "--out", str(tmp_path / name)], check=True, env=env,
                       capture_output=True)
    multi, single = (json.loads((tmp_path / n / "details" / "deit_tiny_W4A4_smoke.json").read_text())["blocks"]
                     for n in ("multi", "single"))
    assert list(multi) == list(single) == ["W4A4 repq_vit dense"]
    assert [b["r2"] for b in multi["W4A4 repq_vit dense"]] == pytest.approx(
        [b["r2"] for b in single["W4A4 repq_vit dense"]], abs=1e-6)
    rows = [json.loads((tmp_path / n / "deit_tiny_W4A4_smoke.json").read_text())["rows"] for n in ("multi", "single")]
    # Equal top-1: the FP64 sums differ in their last bits (another order), below what the FP32 compensation
    # weights resolve, so the two models are the same but for a weight at a rounding tie (≈1e-3 chance per run).
    assert [r["stage"] for r in rows[0]] == [r["stage"] for r in rows[1]] == ["ptq", "qwt"]
    assert [r["top1"] for r in rows[0]] == [r["top1"] for r in rows[1]]


def _star_setup():
    """A compensated smoke DeiT, its FP teacher and a small labelled set, identical in every process."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    fp = qwt.create_model("deit_tiny", smoke=True, num_classes=4)
    gen = torch.Generator().manual_seed(5)
    calib, comp = torch.randn(8, 3, 32, 32, generator=gen), torch.randn(16, 3, 32, 32, generator=gen)
    model = qwt.quantize(copy.deepcopy(fp), calib, qwt.PTQConfig())
    qwt.apply_qwt(model, comp, batch_size=8, progress=False)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 4, (32,), generator=gen))
    return model, fp, data


def _star_train(model, fp, data, rank: int, world: int):
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from qwt.finetune import FinetuneConfig, ShardedBatches, finetune

    gen = torch.Generator().manual_seed(1)
    batches = ShardedBatches(BatchSampler(RandomSampler(data, generator=gen), 8, drop_last=True), rank, world)
    losses = finetune(model, fp, DataLoader(data, batch_sampler=batches, generator=gen), len(batches),
                      FinetuneConfig(lr=1e-3, label_weight=0.5), progress=False)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("comp_weight", "head.weight"))}
    return losses, trained


def _star_worker(rank: int, world: int, port: int, out: str) -> None:
    model, fp, data = _star_setup()  # before joining: apply_qwt would all-reduce otherwise
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    losses, trained = _star_train(model, fp, data, rank, world)
    if rank == 0:
        torch.save({"losses": losses, "trained": trained}, out)
    dist.destroy_process_group()


def test_qwt_star_data_parallel_equals_one_process_with_the_global_batch(tmp_path):
    got = _run_two_ranks(_star_worker, str(tmp_path / "star.pt"))
    model, fp, data = _star_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, trained = _star_train(model, fp, data, 0, 1)
    assert len(losses) == len(got["losses"]) == 4
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    for name, param in trained.items():
        assert not torch.equal(param, before[name])  # it trained
        assert torch.allclose(got["trained"][name], param, atol=1e-6), name
