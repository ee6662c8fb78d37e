"""Reduced-rank QwT compensation (QwTConfig.rank, qwt.compensation.lowrank): the rank-r map is the optimum of the
dense fit's ridge objective under a rank constraint, equals the dense map at full rank, is what the held-out guard
judges and what the wrapper applies, is saved and loaded, and names its own rows in the LM task."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import qwt
from qwt.compensation import (BlockPlan, LinearCompensated, LinearLeastSquares, LowRankCompensated, Step,
                              fit_compensation)
from qwt.compensation.blockwise import parse_form
from qwt.compensation.lowrank import reduced_rank
from qwt.finetune import trainable_parameters
from qwt.models.decoder_lm import build_from_config, tiny_config
from qwt.ptq.baselines import act_quantizer
from qwt.quant.modules import QuantLinear, quant_state
from qwt.quant.rtn import MinMaxWeightQuantizer
from qwt.tasks import llm
from test_llm import local_model  # noqa: F401 (the tiny checkpoint folder fixture)


def _problem(rows: int = 300, d: int = 12, o: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with uneven scales (so the metric G + λI matters) and a noisy full-rank target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, d, dtype=torch.float64)
    t = x @ torch.randn(d, o, generator=g, dtype=torch.float64) + torch.randn(rows, o, generator=g,
                                                                              dtype=torch.float64)
    return x, t


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _objective(a: torch.Tensor, t: torch.Tensor, theta: torch.Tensor, ridge: float) -> float:
    return float((t - a @ theta).pow(2).sum() + ridge * theta.pow(2).sum())


# -- the solution ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,o", [(12, 9), (5, 9)])  # rank capped by C_out, then by C_in + 1 < C_out
def test_a_rank_at_or_above_full_gives_the_dense_fit(d, o):
    """Θ* V Vᵀ with V an FP64 orthonormal basis of every direction Θ* uses differs from Θ* by ~1e-15 relative; both
    are rounded once to FP32, so the stored maps agree to an FP32 ulp or two (rtol 1e-6 ≈ 8 ulps)."""
    x, t = _problem(d=d, o=o)
    dense = LinearLeastSquares(ridge=0.5)
    dense.update(x.float(), t.float())
    want = dense.solve()
    for rank in (min(d + 1, o), 1000):
        fit = LinearLeastSquares(ridge=0.5, rank=rank)
        fit.update(x.float(), t.float())
        got = fit.solve()
        scale = float(want.weight.abs().max())
        assert torch.allclose(got.weight, want.weight, rtol=1e-6, atol=1e-6 * scale)
        assert torch.allclose(got.down @ got.up, want.weight, rtol=1e-5, atol=1e-5 * scale)
        assert torch.allclose(got.bias, want.bias, rtol=1e-6, atol=1e-6 * scale)
        assert got.r2 == pytest.approx(want.r2, abs=1e-10) and got.energy_kept == pytest.approx(1.0, abs=1e-12)
        assert got.down.shape == (d, min(d + 1, o)) and got.up.shape == (min(d + 1, o), o)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_the_rank_r_map_attains_the_lower_bound_of_the_ridge_objective(rank):
    """Independently: with the ridge as extra rows ([A; √λI], [T; 0]) the objective is ‖T̃ − ÃΘ‖², and for any Θ
    of rank ≤ r it is ‖T̃ − Ŷ‖² + ‖Ŷ − ÃΘ‖² ≥ ‖T̃ − Ŷ‖² + Σ_{i>r} σᵢ(Ŷ)² (Ŷ the least-squares fit, by lstsq,
    residual orthogonal to Ã's columns; Eckart–Young). The rank-r map attains that bound to FP64 precision, and
    truncating Θ*'s own SVD instead does worse."""
    x, t = _problem()
    ridge = 2.0
    a = _design(x)
    lhs = a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype)
    theta = torch.linalg.solve(lhs, a.T @ t)
    ours = reduced_rank(theta, lhs, rank)
    assert ours.down.shape == (13, rank) and ours.up.shape == (rank, 9)
    a_aug = torch.cat([a, ridge ** 0.5 * torch.eye(a.shape[1], dtype=a.dtype)])
    t_aug = torch.cat([t, torch.zeros(a.shape[1], t.shape[1], dtype=t.dtype)])
    fitted = a_aug @ torch.linalg.lstsq(a_aug, t_aug).solution
    sigma = torch.linalg.svdvals(fitted)
    bound = float((t_aug - fitted).pow(2).sum() + sigma[rank:].pow(2).sum())
    assert _objective(a, t, ours.theta, ridge) == pytest.approx(bound, rel=1e-10)
    u, s, vh = torch.linalg.svd(theta, full_matrices=False)
    plain = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert _objective(a, t, ours.theta, ridge) < _objective(a, t, plain, ridge)
    assert ours.energy_kept == pytest.approx(float(sigma[:rank].pow(2).sum() / sigma.pow(2).sum()), rel=1e-10)
    fit = LinearLeastSquares(ridge=ridge, rank=rank)  # the solver's streaming path gives the same map
    fit.update(x.float(), t.float())
    got = fit.solve()
    assert torch.allclose(got.weight.double(), ours.theta[:-1], rtol=1e-4, atol=1e-4 * float(ours.theta.abs().max()))
    dense = LinearLeastSquares(ridge=ridge)
    dense.update(x.float(), t.float())
    assert got.r2 < dense.solve().r2 and got.energy_kept == pytest.approx(ours.energy_kept, rel=1e-4)


# -- in the block-wise fit -------------------------------------------------------------------------------------

def _rows() -> torch.Tensor:
    return torch.randn(16, 24, 16, generator=torch.Generator().manual_seed(5))


def _fit(config: qwt.QwTConfig) -> tuple[nn.Module, qwt.compensation.BlockReports]:
    """One block of one quantised Linear (16 → 16), compensated on 8 batches of 2 samples of 24 rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(QuantLinear(nn.Linear(16, 16), act_quantizer(4), MinMaxWeightQuantizer(4))))
    qwt.calibrate(model, _rows()[:2])
    plan = BlockPlan(stem=lambda b: b, steps=[Step("0")], form="linear", check_inputs=lambda b, what: b)
    return model, fit_compensation(model, plan, _rows(), config, batch_size=2, progress=False)


def test_the_guard_judges_and_the_wrapper_applies_the_rank_r_map():
    """The guard's held-out error with the compensation is the rank-r map's (D·U, b_r) on the held-out rows, not
    the dense map's; the wrapper holds the factors and adds (x·D)·U + b_r."""
    model, reports = _fit(qwt.QwTConfig(rank=2, fp16_eval=False, guard_fraction=0.25))
    dense_model, dense_reports = _fit(qwt.QwTConfig(fp16_eval=False, guard_fraction=0.25))
    comp = model[0]
    assert isinstance(comp, LowRankCompensated) and comp.comp_down.shape == (16, 2) and comp.comp_up.shape == (2, 16)
    assert reports[0].extra["rank"] == 2 and 0 < reports[0].extra["energy_kept"] < 1
    held = qwt.compensation.heldout_inputs(_rows(), 2, 0.25)
    with torch.no_grad():
        with quant_state(comp.block, weight=False, act=False):
            fp = comp.block(held)
        target = (fp - comp.block(held)).double()
        w, b = comp.comp_down.double() @ comp.comp_up.double(), comp.comp_bias.double()
        rank_error = float((target - held.double() @ w - b).pow(2).sum())
        assert torch.allclose(comp(held), comp.block(held) + (held @ comp.comp_down) @ comp.comp_up + comp.comp_bias)
    guard = reports[0].extra["guard"]
    assert guard["kept"] and guard["heldout_error_compensated"] == pytest.approx(rank_error, rel=1e-5)
    dense = dense_reports[0].extra["guard"]["heldout_error_compensated"]
    assert abs(dense - rank_error) > 1e-3 * rank_error  # the two maps are told apart at this tolerance
    assert isinstance(dense_model[0], LinearCompensated)


def test_a_full_rank_in_the_block_fit_gives_the_dense_wrapper_map():
    model, reports = _fit(qwt.QwTConfig(rank=64, fp16_eval=False))
    dense, _ = _fit(qwt.QwTConfig(fp16_eval=False))
    comp = model[0]
    assert comp.comp_down.shape == (16, 16) and reports[0].extra["energy_kept"] == pytest.approx(1.0, abs=1e-12)
    scale = float(dense[0].comp_weight.detach().abs().max())
    assert torch.allclose(comp.comp_down @ comp.comp_up, dense[0].comp_weight, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(comp.comp_bias, dense[0].comp_bias, rtol=1e-5, atol=1e-5 * scale)


def test_size_counts_the_factors_in_fp16_and_finetuning_trains_them():
    g = torch.Generator().manual_seed(0)
    down, up, bias = torch.randn(6, 2, generator=g), torch.randn(2, 6, generator=g), torch.randn(6, generator=g)
    comp = LowRankCompensated(nn.Identity(), down, up, bias, fp16_eval=True).eval()
    assert qwt.size.model_size_bits(comp) == (6 * 2 + 2 * 6) * 16 + 6 * 32
    x = torch.randn(5, 6, generator=g)
    exact = x + x @ (down @ up) + bias
    assert not torch.equal(comp(x), exact) and torch.allclose(comp(x), exact, rtol=1e-2, atol=1e-2)  # FP16 product
    comp.fp16_eval = False
    assert qwt.size.model_size_bits(comp) == (6 * 2 + 2 * 6 + 6) * 32
    assert torch.allclose(comp(x), exact, rtol=1e-6, atol=1e-6)
    names = [n for n, _ in trainable_parameters(nn.Sequential(comp), ())]
    assert names == ["0.comp_down", "0.comp_up", "0.comp_bias"]


def test_save_load_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    fp = build_from_config(config=tiny_config("llama"))
    config = qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=8)
    ids = torch.randint(0, 128, (20, 32), generator=torch.Generator().manual_seed(1))
    model = qwt.quantize(copy.deepcopy(fp), ids[:4], config)
    reports = qwt.apply_qwt(model, ids[4:16], qwt.QwTConfig(rank=4, fp16_eval=False, guard_fraction=0.25),
                            batch_size=2, progress=False)
    assert all(r.extra["rank"] == 4 for r in reports)
    with torch.no_grad():
        logits = model(ids[16:]).logits
    qwt.save_quantized(model, tmp_path / "m", "hf_causal_lm", config, {"config": tiny_config("llama")})
    loaded = qwt.load_quantized(tmp_path / "m")
    assert sum(isinstance(m, LowRankCompensated) for m in loaded.modules()) == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids[16:]).logits, logits)
    assert qwt.model_size_mb(loaded) == qwt.model_size_mb(model)


# -- the LM task and refusals ----------------------------------------------------------------------------------

def test_the_lm_task_gives_a_rank_row_beside_the_dense_one(local_model, tmp_path):
    """A tiny Llama checkpoint (test_llm's, with a character tokenizer: SmolLM2's takes seconds to load)."""
    out = tmp_path / "out"
    argv = ["--model", local_model / "model", "--calib-text", local_model / "calib.txt", "--eval-text",
            local_model / "eval.txt", "--window", 32, "--calib-windows", 8, "--ptq-windows", 2, "--eval-windows", 4,
            "--batch-size", 2, "--bits", "W4A8", "--forms", "dense", "rank4", "--guard-fraction", 0,
            "--continuation-tokens", 2, "--no-progress", "--out", out]
    assert llm.main("test", [str(a) for a in argv]) == 0
    record = json.loads((out / "model.json").read_text())
    assert [(r["stage"], r["form"]) for r in record["rows"]] == [("fp", None), ("ptq", None), ("qwt", "dense"),
                                                                 ("qwt", "rank4")]
    dense, rank = record["rows"][2:]
    assert rank["size_mb"] < dense["size_mb"]
    blocks = json.loads((out / "details" / "model.json").read_text())["blocks"]["W4A8 rtn rank4"]
    assert [b["extra"]["rank"] for b in blocks] == [4, 4] and all(0 < b["extra"]["energy_kept"] <= 1 for b in blocks)
    assert "PTQ + QwT rank4" in (out / "model.md").read_text()


@pytest.mark.parametrize("fields,message", [
    ({"rank": 4, "compensation": "channelwise"}, "compensation='channelwise' has none"),
    ({"rank": 0}, "rank must be ≥ 1"),
    ({"rank": 4, "solver": "reference"}, "needs a streaming solver"),
    ({"rank": 2.5}, "rank takes an integer or None"),
])
def test_bad_rank_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        qwt.QwTConfig(**fields)


def test_the_solver_and_a_conv_plan_refuse_a_rank():
    with pytest.raises(ValueError, match="needs a streaming solver"):
        LinearLeastSquares(rank=4, mode="reference")
    plan = BlockPlan(stem=lambda b: b, steps=[Step("0")], form="conv", check_inputs=lambda b, what: b)
    with pytest.raises(ValueError, match="rank 4: a reduced-rank compensation is a token"):
        fit_compensation(nn.Sequential(nn.Conv2d(4, 4, 1)), plan, torch.randn(2, 4, 4, 4), qwt.QwTConfig(rank=4),
                         progress=False)


def test_form_names_read_back():
    for name in ("dense", "channelwise", "rank64"):
        assert qwt.QwTConfig(**parse_form(name)).form_name == name
    for bad in ("rank0", "rank", "rank-4", "lowrank", "Dense"):
        with pytest.raises(ValueError, match="choose dense, channelwise or rank<R>"):
            parse_form(bad)


@pytest.mark.parametrize("forms,message", [
    (["rank0"], "argument --forms: unknown QwT form 'rank0'"),
    (["dense", "lowrank"], "argument --forms: unknown QwT form 'lowrank'"),
    (["rank4", "rank04"], "QwT form rank4 given more than once"),
])
def test_the_lm_task_refuses_bad_forms_before_any_compute(forms, message, tmp_path, capsys):
    try:
        code = llm.main("test", ["--forms", *forms, "--out", str(tmp_path / "out")])
    except SystemExit as exit:
        code = exit.code
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()
