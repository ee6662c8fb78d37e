"""The closed-form solver: planted maps, streaming vs one-shot, grouped conv vs per-group lstsq, bad systems."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from qwt.compensation import GroupedConvLeastSquares, LinearLeastSquares, SingularSystemError, conv_groups


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_linear_recovers_planted_map_exactly():
    x = torch.randn(4, 50, 16, generator=_gen(0)) * 3 + 1
    w, b = torch.randn(16, 8, generator=_gen(1)), torch.randn(8, generator=_gen(2))
    fit = LinearLeastSquares()
    for chunk in x.split(1):
        fit.update(chunk, chunk @ w + b)
    res = fit.solve()
    assert torch.allclose(res.weight, w, atol=1e-5) and torch.allclose(res.bias, b, atol=1e-5)
    assert res.r2 == pytest.approx(1.0, abs=1e-9)


def test_streaming_equals_one_shot_reference():
    x = torch.randn(6, 40, 12, generator=_gen(3))
    t = torch.tanh(x @ torch.randn(12, 12, generator=_gen(4))) + 0.1 * torch.randn(6, 40, 12, generator=_gen(5))
    streamed, reference = LinearLeastSquares(mode="streaming"), LinearLeastSquares(mode="reference")
    for xb, tb in zip(x.split(2), t.split(2)):
        streamed.update(xb, tb)
        reference.update(xb, tb)
    one_shot = LinearLeastSquares(mode="streaming")
    one_shot.update(x, t)
    a, b, c = streamed.solve(), reference.solve(), one_shot.solve()
    # Streamed vs one shot: FP64 sums in another order (≈1e-16 relative). Reference mode: FP32 Gram and explicit
    # inverse, relative error ≈ K·cond(AᵀA)·u_fp32 (cond ≈ 2 here, K = 13): far below 1e-4 on O(1) weights.
    assert torch.allclose(a.weight, c.weight, atol=1e-6) and a.r2 == pytest.approx(c.r2, abs=1e-12)
    assert torch.allclose(a.weight, b.weight, atol=1e-4) and torch.allclose(a.bias, b.bias, atol=1e-4)
    assert a.r2 == pytest.approx(b.r2, abs=1e-5)
    # R² by its definition: 1 − SS_res / SS_tot with the mean over all rows.
    rows_t = t.reshape(-1, 12).double()
    pred = (x.reshape(-1, 12) @ a.weight + a.bias).double()
    r2 = 1 - (rows_t - pred).pow(2).sum() / (rows_t - rows_t.mean(0)).pow(2).sum()
    assert a.r2 == pytest.approx(r2.item(), abs=1e-6)


def test_linear_r2_is_negative_infinity_for_zero_target_and_zero_for_noise_mean():
    fit = LinearLeastSquares()
    fit.update(torch.randn(100, 4, generator=_gen(6)), torch.zeros(100, 3))
    assert fit.solve().r2 == float("-inf")


@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_grouped_conv_matches_per_group_least_squares(kernel, stride):
    cin, cout, groups = 8, 12, 4
    x = torch.randn(3, cin, 9, 9, generator=_gen(7))
    w = torch.randn(cout, cin // groups, kernel, kernel, generator=_gen(8))
    t = F.conv2d(x, w, torch.randn(cout, generator=_gen(9)), stride=stride, padding=kernel // 2, groups=groups)
    t = t + 0.3 * torch.randn(t.shape, generator=_gen(10))
    fit = GroupedConvLeastSquares(cin, cout, kernel, stride, groups, ridge=1e-3)
    for xb, tb in zip(x.split(1), t.split(1)):
        fit.update(xb, tb)
    res = fit.solve()
    # Direct solve per group: ridge least squares on unfolded patches with a ones column.
    patches = F.unfold(x, kernel, padding=kernel // 2, stride=stride)  # (B, cin·k², L)
    for g in range(groups):
        p = patches[:, g * (cin // groups) * kernel**2:(g + 1) * (cin // groups) * kernel**2]
        a = p.permute(0, 2, 1).reshape(-1, p.shape[1]).double()
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        tg = t[:, g * (cout // groups):(g + 1) * (cout // groups)].permute(0, 2, 3, 1).reshape(-1, cout // groups)
        theta = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ tg.double())
        wg = res.weight[g * (cout // groups):(g + 1) * (cout // groups)].reshape(cout // groups, -1)
        assert torch.allclose(wg.double(), theta[:-1].T, atol=1e-5)
        assert torch.allclose(res.bias[g * (cout // groups):(g + 1) * (cout // groups)].double(), theta[-1], atol=1e-5)
    # Predictions through conv2d with the fitted weights; R² with the mean over the batch axis only.
    pred = F.conv2d(x, res.weight, res.bias, stride=stride, padding=kernel // 2, groups=groups).double()
    td = t.double()
    r2 = 1 - (td - pred).pow(2).sum() / (td - td.mean(0, keepdim=True)).pow(2).sum()
    assert res.r2 == pytest.approx(r2.item(), abs=1e-6)


def _plain_fp64_design(x: torch.Tensor, t: torch.Tensor, groups: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per group, A = [features, 1] and T as contiguous FP64 rows, built the obvious way."""
    if groups is None:
        x, t = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
        pairs = [(x, t)]
    else:
        cin, cout = x.shape[1] // groups, t.shape[1] // groups
        pairs = [(x[:, g * cin:(g + 1) * cin].permute(0, 2, 3, 1).reshape(-1, cin),
                  t[:, g * cout:(g + 1) * cout].permute(0, 2, 3, 1).reshape(-1, cout)) for g in range(groups)]
    return [(torch.cat([f.double(), torch.ones(f.shape[0], 1, dtype=torch.float64)], 1), tg.double().contiguous())
            for f, tg in pairs]


@pytest.mark.parametrize("form", ["linear", "conv"])
def test_streaming_statistics_are_the_plain_fp64_products(form):
    """Pins the default solver's arithmetic: per batch, AᵀA and AᵀT are batched FP64 GEMMs on row-major FP64
    copies of the FP32 values (however the copies are made), ΣT and ΣT² sum the exact FP64 values of T in its
    own layout, and batches add up in order."""
    g = _gen(31)
    if form == "linear":
        batches = [(torch.randn(4, 300, 24, generator=g), torch.randn(4, 300, 16, generator=g)) for _ in range(3)]
        fit, groups = LinearLeastSquares(), None
    else:
        batches = [(torch.randn(4, 32, 20, 20, generator=g), torch.randn(4, 32, 20, 20, generator=g))
                   for _ in range(3)]
        fit, groups = GroupedConvLeastSquares(32, 32, 1, 1, 2), 2
    gram = cross = t_sum = t_sq = None
    for x, t in batches:
        fit.update(x, t)
        pairs = _plain_fp64_design(x, t, groups)
        a, tg = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        g64, c64 = a.transpose(1, 2) @ a, a.transpose(1, 2) @ tg  # batched, as one GEMM per group
        t64 = t.double()
        s64 = t64.reshape(-1, t.shape[-1]).sum(0) if groups is None else t64.sum(0)
        q64 = t64.pow(2).sum()
        gram, cross = (g64, c64) if gram is None else (gram + g64, cross + c64)
        t_sum, t_sq = (s64, q64) if t_sum is None else (t_sum + s64, t_sq + q64)
    assert torch.equal(fit.gram, gram) and torch.equal(fit.cross, cross)
    assert torch.equal(fit.t_sum, t_sum) and torch.equal(fit.t_sq, t_sq)


@pytest.mark.parametrize("form", ["linear", "conv"])
def test_fp32_products_are_summed_in_fp64_and_solve_close_to_fp64(form):
    """streaming_fp32: each batch's AᵀA and AᵀT in FP32 (the same design matrices), accumulated in FP64."""
    g = _gen(21)
    if form == "linear":
        batches = [(torch.randn(3, 20, 10, generator=g), torch.randn(3, 20, 6, generator=g)) for _ in range(3)]
        fits = [LinearLeastSquares(mode=m) for m in ("streaming", "streaming_fp32")]
    else:
        batches = [(torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 8, 6, 6, generator=g)) for _ in range(3)]
        fits = [GroupedConvLeastSquares(8, 8, 1, 1, 2, mode=m) for m in ("streaming", "streaming_fp32")]
    for x, t in batches:
        for f in fits:
            f.update(x, t)
    fp64, fp32 = fits
    gram = cross = None
    for x, t in batches:
        a, target = fp32._design(x, t, torch.float32)
        g32, c32 = (a.transpose(1, 2) @ a).double(), (a.transpose(1, 2) @ target).double()
        gram, cross = (g32, c32) if gram is None else (gram + g32, cross + c32)
    assert fp32.gram.dtype == torch.float64 and torch.equal(fp32.gram, gram) and torch.equal(fp32.cross, cross)
    assert fp32.t_sq.item() == pytest.approx(fp64.t_sq.item(), rel=1e-6)
    a, b = fp64.solve(), fp32.solve()
    assert torch.allclose(a.weight, b.weight, atol=1e-4) and torch.allclose(a.bias, b.bias, atol=1e-4)
    assert a.r2 == pytest.approx(b.r2, abs=1e-5)


def test_grouped_conv_reference_mode_matches_streaming():
    x = torch.randn(4, 6, 5, 5, generator=_gen(11))
    t = torch.randn(4, 6, 5, 5, generator=_gen(12))
    fits = [GroupedConvLeastSquares(6, 6, 3, 1, 2, mode=m) for m in ("streaming", "reference")]
    for f in fits:
        f.update(x, t)
    a, b = (f.solve() for f in fits)
    assert torch.allclose(a.weight, b.weight, atol=1e-3) and a.r2 == pytest.approx(b.r2, abs=1e-4)


def test_conv_groups_divide_both_channel_counts():
    assert conv_groups(256, 512, 64) == 4  # the authors' G = C_in // 64
    assert conv_groups(64, 256, 64) == 1
    assert conv_groups(192, 320, 64) == 2  # 3 does not divide 320 → the largest common divisor ≤ 3
    assert conv_groups(112, 112, 16) == 7
    assert conv_groups(40, 80, 8) == 5


def test_singular_system_warns_and_falls_back():
    """An all-zero channel makes the Gram exactly singular (its row and column are exact zeros in any summation
    order), so Cholesky fails on every CPU and the pseudo-inverse takes over."""
    x = torch.randn(200, 3, generator=_gen(13))
    x = torch.cat([x, torch.zeros(200, 1)], 1)
    t = x @ torch.randn(4, 2, generator=_gen(14))
    fit = LinearLeastSquares()
    fit.update(x, t)
    with pytest.warns(RuntimeWarning, match="singular"):
        res = fit.solve()
    # Minimum norm: nothing on the zero channel, up to the FP64 eigensolver's rounding.
    assert torch.isfinite(res.weight).all() and res.weight[3].abs().max() <= 1e-6
    assert res.r2 == pytest.approx(1.0, abs=1e-6)


def test_duplicated_channel_is_fitted_whichever_way_cholesky_goes():
    """A duplicated channel makes the Gram singular only in exact arithmetic: the rounding of its sums (the CPU's
    GEMM kernel) decides whether Cholesky fails (pseudo-inverse, with the warning) or passes on a nearly singular
    matrix. Either way the fit is finite and exact on these targets; no warning is promised."""
    x = torch.randn(200, 3, generator=_gen(13))
    x = torch.cat([x, x[:, :1]], 1)
    t = x @ torch.randn(4, 2, generator=_gen(14))
    fit = LinearLeastSquares()
    fit.update(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = fit.solve()
    assert torch.isfinite(res.weight).all()
    assert res.r2 == pytest.approx(1.0, abs=1e-6)


def test_reference_mode_refuses_a_singular_system():
    x = torch.zeros(50, 3)
    fit = LinearLeastSquares(mode="reference")
    fit.update(x, torch.randn(50, 2, generator=_gen(15)))
    with pytest.raises(SingularSystemError):
        fit.solve()


@pytest.mark.parametrize("mode", ["streaming", "streaming_fp32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_refused(bad, mode):
    fit = LinearLeastSquares(mode=mode)
    x = torch.randn(10, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit.update(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit.update(torch.randn(10, 3), x)


def test_solve_without_data_is_refused():
    with pytest.raises(ValueError, match="no data"):
        LinearLeastSquares().solve()
    with pytest.raises(ValueError, match="solver mode"):
        LinearLeastSquares(mode="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="must divide"):
            GroupedConvLeastSquares(6, 5, 1, 1, 2)
