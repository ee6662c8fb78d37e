"""Quantiser values on hand-computed cases, and the vectorised search against the authors' per-channel loop."""
import math

import numpy as np
import pytest
import torch

from qwt.quant import LogSqrt2Quantizer, UniformQuantizer, log_sqrt2_fake_quant, uniform_fake_quant
from qwt.quant import percentile as pct_mod
from qwt.quant.percentile import PERCENTILES, row_quantiles
from qwt.quant.quantizers import search_uniform
from qwt.quant.reference import loop_search_uniform


def test_uniform_rounds_half_to_even_and_adds_zero_point_after_rounding():
    delta, levels = torch.tensor(1.0), 16
    x = torch.tensor([0.5, 1.5, 2.5, -0.5])
    # z = 2.5 (fractional, as after reparameterisation): round(x) + z, clamp to [0, 15], minus z.
    out = uniform_fake_quant(x, delta, torch.tensor(2.5), levels)
    assert out.tolist() == [0.0, 2.0, 2.0, 0.0]  # round(0.5)=0, round(1.5)=2, round(2.5)=2, round(-0.5)=-0
    # Clamping: values beyond the grid saturate at (L−1−z)·Δ and −z·Δ.
    out = uniform_fake_quant(torch.tensor([100.0, -100.0]), torch.tensor(0.5), torch.tensor(3.0), levels)
    assert out.tolist() == [(15 - 3) * 0.5, -3 * 0.5]


def test_uniform_calibration_hand_case():
    # 0..15 with 4 bits: every candidate percentile pair of a 16-value ramp is interpolated;
    # the 0.99999 pair (lo=0.00015, hi=14.99985) has the smallest MSE.
    x = torch.arange(16, dtype=torch.float32)
    q = UniformQuantizer(4)
    q.enabled = True
    q(x)
    lo, hi = float(np.float32(0.00001) * 15), float(np.float32(0.99999) * 15)
    assert q.delta.item() == pytest.approx((hi - lo) / 15, rel=1e-6)
    assert q.zero_point.item() == 0.0
    assert torch.allclose(q(x), x, atol=1e-3)


def test_quantizer_is_frozen_after_first_forward():
    q = UniformQuantizer(4)
    q.enabled = True
    q(torch.linspace(-1, 1, 100))
    delta = q.delta.clone()
    q(torch.linspace(-10, 10, 100))
    assert torch.equal(q.delta, delta)
    q.reset()
    assert not q.calibrated


def test_disabled_quantizer_is_identity_and_does_not_calibrate():
    q = UniformQuantizer(4)
    x = torch.randn(10)
    assert q(x) is x and not q.calibrated


def test_log_sqrt2_values():
    delta, levels = torch.tensor(1.0), 16
    x = torch.tensor([1.0, 2 ** -0.5, 0.5, 2 ** -1.5, 3.0, 0.0])
    out = log_sqrt2_fake_quant(x, delta, levels, floor=None)
    expected = [1.0, 2 ** -0.5, 0.5, 2 ** -1.5, 1.0, 0.0]  # codes 0,1,2,3; above Δ clamps to Δ; 0 → 0
    assert torch.allclose(out, torch.tensor(expected), atol=1e-7)
    # Codes ≥ L are zeroed: 2^-8 has code 16 at 4 bits.
    assert log_sqrt2_fake_quant(torch.tensor([2.0 ** -8]), delta, levels, None).item() == 0.0


def test_log_sqrt2_floor_differs_only_above_5_bits():
    x = torch.tensor([0.0, 1e-9, 0.5])
    d = torch.tensor(1.0)
    assert torch.equal(log_sqrt2_fake_quant(x, d, 32, 1e-6), log_sqrt2_fake_quant(x, d, 32, None))
    floored = log_sqrt2_fake_quant(x, d, 256, 1e-6)
    assert floored[0].item() == pytest.approx(2.0 ** -20)  # the QwT authors' clamp: zero decodes to Δ·2⁻²⁰
    assert log_sqrt2_fake_quant(x, d, 256, None)[0].item() == 0.0


def test_log_sqrt2_calibration_picks_a_candidate_percentile():
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0)).pow(4)
    q = LogSqrt2Quantizer(4)
    q.enabled = True
    q(x)
    candidates = [torch.quantile(x, p).item() for p in PERCENTILES]
    assert any(math.isclose(q.delta.item(), c, rel_tol=1e-6) for c in candidates)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 6304])
def test_row_quantiles_match_torch_quantile(n):
    rows = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    qs = [1 - p for p in PERCENTILES] + list(PERCENTILES)
    expected = torch.stack([torch.quantile(rows, q, dim=1) for q in qs], dim=1)
    assert torch.equal(row_quantiles(rows, qs), expected)


def _long_rows() -> dict[str, torch.Tensor]:
    """Single rows long enough for the pre-filtered tail selection, with ties and unhelpful sub-samples."""
    g = torch.Generator().manual_seed(3)
    n = 200_003
    normal = torch.randn(n, generator=g)
    spiky = normal.clone()
    spiky[::16] = -1e6  # every sampled value is the minimum: the bound is useless, all values survive
    return {"normal": normal, "integer ties": torch.randint(-3, 4, (n,), generator=g).float(),
            "ascending": normal.sort().values, "descending": normal.sort(descending=True).values,
            "spiky sample": spiky, "signed zeros": torch.where(normal > 0, normal, -0.0 * normal.abs())}


@pytest.mark.parametrize("kind", list(_long_rows()))
def test_long_single_rows_match_torch_quantile(kind):
    row = _long_rows()[kind]
    qs = [1 - p for p in PERCENTILES] + list(PERCENTILES)
    expected = torch.stack([torch.quantile(row, q) for q in qs]).unsqueeze(0)
    assert torch.equal(row_quantiles(row.unsqueeze(0), qs), expected)
    for largest in (True, False):
        k = 300
        assert torch.equal(pct_mod._tail(row.unsqueeze(0), k, largest),
                           torch.topk(row.unsqueeze(0), k, largest=largest, sorted=True).values)


def _legacy_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """What older torch releases compute: float32 rank arithmetic, inputs above 2**24 values refused."""
    if x.numel() > pct_mod.LEGACY_QUANTILE_MAX_NUMEL:
        raise RuntimeError("quantile() input tensor is too large")
    values = x.reshape(-1).sort().values
    rank = torch.tensor(q, dtype=x.dtype) * (values.numel() - 1)
    below = rank.floor()
    return torch.lerp(values[int(below)], values[int(rank.ceil())], rank - below)


@pytest.fixture
def fresh_probe():
    pct_mod._rank_behaviour.cache_clear()
    pct_mod._max_numel.cache_clear()
    yield
    pct_mod._rank_behaviour.cache_clear()
    pct_mod._max_numel.cache_clear()


def test_probe_distinguishes_the_two_rank_arithmetics(fresh_probe):
    # The probe tensor must tell the two apart, or a legacy torch would be taken for a current one.
    n, q = 100_003, 0.999
    x = torch.zeros(1, n)
    x[0, int(float(torch.tensor(q)) * (n - 1)) + 1:] = 1.0
    assert not torch.equal(pct_mod._torch_style(x, [q], "float64"), pct_mod._torch_style(x, [q], "input_dtype"))
    assert pct_mod.quantile_behaviour().rank in ("float64", "input_dtype")


def test_legacy_torch_quantile_is_mirrored_rank_and_limit(monkeypatch, fresh_probe):
    monkeypatch.setattr(torch, "quantile", _legacy_quantile)
    monkeypatch.setattr(pct_mod, "LEGACY_QUANTILE_MAX_NUMEL", 150_000)
    assert pct_mod.quantile_behaviour() == pct_mod.QuantileBehaviour("input_dtype", 150_000)
    rows = torch.randn(3, 4001, generator=torch.Generator().manual_seed(0))
    qs = [0.001, 0.999, 0.9999]
    expected = torch.stack([torch.stack([_legacy_quantile(r, q) for q in qs]) for r in rows])
    assert torch.equal(row_quantiles(rows, qs), expected)
    big = torch.randn(1, 150_001, generator=torch.Generator().manual_seed(1))  # refused by this torch: numpy
    numpy_expected = np.percentile(big.double().numpy()[0], [q * 100 for q in qs]).astype(np.float32)
    assert row_quantiles(big, qs)[0].tolist() == numpy_expected.tolist()


@pytest.mark.parametrize("numel", [2**24, 2**24 + 3])
def test_row_quantiles_match_installed_torch_on_both_sides_of_2_pow_24(numel, fresh_probe):
    x = torch.randn(1, numel, generator=torch.Generator().manual_seed(numel))
    qs = [1 - p for p in PERCENTILES] + list(PERCENTILES)
    try:
        expected = torch.stack([torch.quantile(x[0], q) for q in qs]).unsqueeze(0)
    except RuntimeError:  # this torch refuses: the authors' code falls back to numpy
        expected = torch.from_numpy(np.percentile(x.double().numpy()[0], [q * 100 for q in qs]).astype(np.float32))
        expected = expected.unsqueeze(0)
    assert torch.equal(row_quantiles(x, qs), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_vectorised_channel_search_equals_loop(bits):
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(bits)) * torch.rand(64, 1) * 3
    delta, zero = search_uniform(w, bits)
    ref_delta, ref_zero = loop_search_uniform(w, bits)
    assert torch.equal(delta, ref_delta)
    assert torch.equal(zero, ref_zero)


def _symmetric_candidates(rows: torch.Tensor) -> torch.Tensor:
    """max(|lo|, |hi|) of every percentile pair the search tries, (rows, pairs)."""
    k = len(PERCENTILES)
    quantiles = row_quantiles(rows, [1.0 - p for p in PERCENTILES] + list(PERCENTILES))
    return torch.maximum(quantiles[:, :k].abs(), quantiles[:, k:].abs())


@pytest.mark.parametrize("bits", [3, 8])
def test_the_two_symmetric_grids(bits):
    """``symmetric`` (integer export): Δ = m/(L/2 − 1), so ±m are codes 1 and L−1 and code 0 only holds values
    clipped below −m; ``symmetric_full`` (GPTQ, as published): Δ = 2·m/(L − 1), [−m, m] spread over every code.
    Both fix z at L/2. m = max(|lo|, |hi|) of the percentile pair the search picks."""
    levels = 2**bits
    rows = torch.randn(6, 400, generator=torch.Generator().manual_seed(bits)) + torch.arange(6.0)[:, None]
    m = _symmetric_candidates(rows)
    for grid, steps in (("symmetric", m / (levels // 2 - 1)), ("symmetric_full", 2 * m / (levels - 1))):
        delta, zero = search_uniform(rows, bits, grid)
        assert torch.equal(zero, torch.full_like(zero, levels // 2))
        # The step of one of the candidate ranges (up to the search's own FP32 arithmetic of it).
        assert ((steps - delta[:, None]).abs() <= 1e-6 * delta[:, None]).any(1).all(), grid


def test_channel_axes_of_weights_and_activations():
    wq = UniformQuantizer(4, channel_axis=0)
    wq.enabled = True
    wq(torch.randn(8, 3, 3, 3))
    assert wq.delta.shape == (8, 1, 1, 1)
    aq = UniformQuantizer(4, channel_axis=-1)
    aq.enabled = True
    aq(torch.randn(2, 5, 6))
    assert aq.delta.shape == (1, 1, 6)


def test_constant_channel_is_represented_exactly():
    q = UniformQuantizer(4, channel_axis=0)
    q.enabled = True
    w = torch.stack([torch.zeros(10), torch.full((10,), 0.3), torch.full((10,), -2.0), torch.randn(10)])
    out = q(w)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:3], w[:3], atol=1e-6)


def test_straight_through_gradient():
    q = UniformQuantizer(4)
    q.enabled = True
    x = torch.randn(50, requires_grad=True)
    q(x.detach())  # calibrate
    q(x).sum().backward()
    code = (x.detach() / q.delta).round() + q.zero_point
    inside, outside = (code > 0) & (code < 15), (code < 0) | (code > 15)
    assert inside.sum() > 40
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())))  # round passes the gradient
    assert torch.all(x.grad[outside] == 0)  # clamping stops it


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_out_of_range_are_refused(bits):
    with pytest.raises(ValueError, match="2..8"):
        UniformQuantizer(bits)


def test_nan_in_calibration_is_refused():
    q = UniformQuantizer(4)
    q.enabled = True
    with pytest.raises(ValueError, match="NaN or Inf"):
        q(torch.tensor([1.0, float("nan")]))
    assert not q.calibrated


@pytest.mark.parametrize("levels", [16, 64, 256])
def test_in_place_inference_path_is_bit_identical_to_the_autograd_path(levels):
    g = torch.Generator().manual_seed(levels)
    x = torch.randn(8, 50, 33, generator=g) * 3
    soft = torch.rand(8, 4, 20, 20, generator=g).pow(3)
    soft[0, 0, 0, :4] = 0
    delta, zero = torch.rand(1, 1, 33, generator=g) + 0.05, torch.tensor(2.5)
    with_grad = uniform_fake_quant(x.clone().requires_grad_(), delta, zero, levels).detach()
    with torch.no_grad():
        assert torch.equal(uniform_fake_quant(x, delta, zero, levels), with_grad)
    for floor in (None, 1e-6):
        with_grad = log_sqrt2_fake_quant(soft.clone().requires_grad_(), torch.tensor(0.4), levels, floor).detach()
        with torch.no_grad():
            assert torch.equal(log_sqrt2_fake_quant(soft, torch.tensor(0.4), levels, floor), with_grad)
