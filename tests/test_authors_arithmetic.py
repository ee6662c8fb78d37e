"""QwT's `reference` mode reproduces the authors' arithmetic bit for bit.

The authors' block loop is re-stated here from the algorithm's description (docs/algorithm.md), independently
of the library's loop: their compensated block, their FP32 least-squares solve (one 2-D explicit inverse per
channel group), their R², their fit-time pass (FP32, training-mode branch) and their FP16 evaluation path.
Every comparison is exact (``torch.equal``), and each arithmetic test also shows that the obvious alternative
order would differ, so the test can fail.
"""
import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qwt import PTQConfig, QwTConfig, apply_qwt, quantize
from qwt.compensation import ConvCompensated, GroupedConvLeastSquares, LinearCompensated
from qwt.models import resnet_plan, vit_plan
from qwt.quant import set_quant_state


def _wide(shape, seed):
    """Values over several orders of magnitude, so that summation order shows in the last bits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))


# -- the compensated block's two forwards --------------------------------------------------------------------

def test_linear_block_fit_time_and_eval_arithmetic():
    y, x = _wide((4, 9, 16), 0), _wide((4, 9, 16), 1)
    w, b = _wide((16, 16), 2), _wide((16,), 3)
    comp = LinearCompensated(nn.Identity(), w, b, fp16_eval=True).eval()
    assert torch.equal(comp.add_fp32(y, x), (y + x @ w) + b)
    assert not torch.equal((y + x @ w) + b, y + (x @ w + b))  # the order is visible in these values
    expected_eval = (y + (x.half() @ w.half()).float()) + b
    assert torch.equal(comp.add_half(y, x), expected_eval)
    assert torch.equal(comp(x), (x + (x.half() @ w.half()).float()) + b)  # eval + half: FP16 product
    assert torch.equal(comp.train()(x), (x + x @ w) + b)  # training mode: FP32
    assert torch.equal(LinearCompensated(nn.Identity(), w, b, fp16_eval=False).eval()(x), (x + x @ w) + b)


def test_conv_block_fit_time_and_eval_arithmetic():
    y, x = _wide((2, 8, 5, 5), 4), _wide((2, 8, 9, 9), 5)
    w, b = _wide((8, 4, 1, 1), 6), _wide((8,), 7)
    comp = ConvCompensated(nn.Identity(), w, b, stride=2, groups=2).eval()
    fit_expected = y + F.conv2d(x, w, b, stride=2, padding=0, groups=2)
    assert torch.equal(comp.add_fp32(y, x), fit_expected)
    unfused = (y + F.conv2d(x, w, None, stride=2, groups=2)) + b.reshape(1, -1, 1, 1)
    assert not torch.equal(fit_expected, unfused)
    half = F.conv2d(x.half(), w.half(), None, stride=2, padding=0, groups=2).float()
    eval_expected = y + (half + b.reshape(1, -1, 1, 1))
    assert torch.equal(comp.add_half(y, x), eval_expected)
    assert not torch.equal(eval_expected, (y + half) + b.reshape(1, -1, 1, 1))


# -- the grouped reference solve --------------------------------------------------------------------------------

def test_reference_grouped_solve_is_a_loop_of_2d_inverses():
    cin, cout, groups, k = 16, 24, 4, 3
    x = torch.randn(6, cin, 7, 7, generator=torch.Generator().manual_seed(8))
    t = torch.randn(6, cout, 7, 7, generator=torch.Generator().manual_seed(9))
    fit = GroupedConvLeastSquares(cin, cout, k, 1, groups, ridge=1e-3, mode="reference")
    for xb, tb in zip(x.split(4), t.split(4)):
        fit.update(xb, tb)
    got = fit.solve()
    weight, bias = _authors_grouped_solve(x, t, k, 1, groups)
    assert torch.equal(got.weight, weight) and torch.equal(got.bias, bias)


# -- end to end: the authors' block loop re-stated ---------------------------------------------------------------

class _AuthorsBlock(nn.Module):
    """Their compensated block: zero unless the fit is kept; FP32 in training mode, FP16 product at eval."""

    def __init__(self, block, weight, bias, keep, groups=None, stride=1):
        super().__init__()
        self.block, self.groups, self.stride = block, groups, stride
        self.w = nn.Parameter(weight.clone() if keep else torch.zeros_like(weight))
        self.b = nn.Parameter(bias.clone() if keep else torch.zeros_like(bias))

    def forward(self, x):
        out = self.block(x)
        if self.groups is None:
            if self.training:
                return out + x @ self.w + self.b
            return out + (x.half() @ self.w.half()).float() + self.b
        pad = self.w.shape[-1] // 2
        if self.training:
            extra = F.conv2d(x, self.w, self.b, stride=self.stride, padding=pad, groups=self.groups)
        else:
            extra = F.conv2d(x.half(), self.w.half(), None, stride=self.stride, padding=pad, groups=self.groups)
            extra = extra.float() + self.b.reshape(1, -1, 1, 1)
        return out + extra


def _r2(t, pred):
    return 1 - torch.sum((t - pred).pow(2)) / torch.sum((t - t.mean(dim=0)).pow(2))


def _authors_linear_solve(x, t):
    x, t = x.reshape(-1, x.size(-1)), t.reshape(-1, t.size(-1))
    xa = torch.cat([x, torch.ones(size=[x.size(0)]).reshape(-1, 1)], dim=-1)
    theta = torch.inverse(xa.t() @ xa) @ xa.t() @ t
    w, b = theta[:-1, :], theta[-1, :]
    return w, b, _r2(t, x @ w + b)


def _authors_grouped_solve(x, t, k, stride, groups):
    n, cx = x.shape[:2]
    cy = t.shape[1]
    ws, bs = [], []
    for g in range(groups):
        xg = F.unfold(x[:, g * cx // groups:(g + 1) * cx // groups], k, stride=stride, padding=k // 2)
        rows = xg.permute(0, 2, 1).reshape(-1, cx // groups * k * k)
        yg = t[:, g * cy // groups:(g + 1) * cy // groups].reshape(n, cy // groups, -1)
        target = yg.permute(0, 2, 1).reshape(-1, cy // groups)
        xa = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
        theta = torch.inverse(xa.T @ xa + 1e-3 * torch.eye(xa.shape[1])) @ xa.T @ target
        ws.append(theta[:-1, :].T)
        bs.append(theta[-1, :])
    return torch.cat(ws, dim=0).view(cy, cx // groups, k, k), torch.cat(bs, dim=0)


@torch.no_grad()
def _authors_loop(model, plan, images, batch, form):
    """Returns per block (X_i, W, b, R²) and leaves ``model`` compensated as theirs would be."""
    set_quant_state(model, weight=True, act=True)
    feats = torch.cat([plan.stem(xb) for xb in images.split(batch)])
    records = []
    for step in plan.steps:
        parent, _, leaf = step.path.rpartition(".")
        block = model.get_submodule(step.path)
        fp, q = [], []
        for xb in feats.split(batch):
            set_quant_state(block, weight=False, act=False)
            fp.append(block(xb))
            set_quant_state(block, weight=True, act=True)
            q.append(block(xb))
        target = torch.cat(fp) - torch.cat(q)
        if form == "linear":
            w, b, r2 = _authors_linear_solve(feats, target)
            wrapper = _AuthorsBlock(block, w, b, bool(r2 > 0))
        else:
            stride = 1 if feats.shape[-1] == target.shape[-1] else 2
            groups = max(feats.shape[1] // 64, 1)
            w, b = _authors_grouped_solve(feats, target, 1, stride, groups)
            r2 = _r2(target, F.conv2d(feats, w, b, stride=stride, padding=0, groups=groups))
            wrapper = _AuthorsBlock(block, w, b, bool(r2 > 0), groups, stride)
        setattr(model.get_submodule(parent), leaf, wrapper)  # a fresh module: training mode, as theirs
        records.append((feats, wrapper.w.detach().clone(), wrapper.b.detach().clone(), float(r2)))
        feats = torch.cat([wrapper(xb) for xb in feats.split(batch)])
    return records


def _library_loop(model, plan_fn, images, batch):
    """The library's reference mode, with each block's input X_i captured by a pre-hook."""
    plan = plan_fn(model)
    seen = {s.path: [] for s in plan.steps}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0]))
             for p in seen]
    reports = apply_qwt(model, images, QwTConfig(solver="reference"), plan=plan, batch_size=batch, progress=False)
    for h in hooks:
        h.remove()
    # Each block runs twice per batch (FP, quantised) on the same input.
    return [(torch.cat(seen[r.path][::2]), model.get_submodule(r.path).comp_weight.detach(),
             model.get_submodule(r.path).comp_bias.detach(), r.r2) for r in reports]


def _compare(model_fn, plan_fn, calib, comp, test, ptq, form, batch):
    quantised = quantize(model_fn(), calib, ptq)
    ours, theirs = copy.deepcopy(quantised), copy.deepcopy(quantised)
    got = _library_loop(ours, plan_fn, comp, batch)
    expected = _authors_loop(theirs, plan_fn(theirs), comp, batch, form)
    assert len(got) == len(expected)
    for i, ((x, w, b, r2), (x_ref, w_ref, b_ref, r2_ref)) in enumerate(zip(got, expected)):
        assert torch.equal(x, x_ref), f"block {i}: X_i differs"
        assert torch.equal(w, w_ref) and torch.equal(b, b_ref), f"block {i}: W or b differs"
        assert r2 == r2_ref, f"block {i}: R² {r2} vs {r2_ref}"
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(test), theirs(test))
    return got


def test_reference_mode_equals_authors_loop_on_a_vit(tiny_vit):
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    comp = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    test = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    got = _compare(lambda: copy.deepcopy(tiny_vit), vit_plan, calib, comp, test, PTQConfig(w_bits=4, a_bits=4),
                   "linear", 32)
    assert any(r2 > 0 for *_, r2 in got)  # some blocks are compensated, so the comparison is not vacuous


def test_reference_mode_equals_authors_loop_on_a_resnet():
    def build():
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None, num_classes=10).eval()

    # 64×64 inputs: layer4 still has 2×2 positions, so every group's system has more rows than unknowns.
    calib = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(14))
    comp = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(15))
    test = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(16))
    got = _compare(build, resnet_plan, calib, comp, test, PTQConfig(baseline="percentile", w_bits=4, a_bits=4),
                   "conv", 16)
    assert any(r2 > 0 for *_, r2 in got)
    assert any(w.shape[1] * 8 == w.shape[0] for _, w, _, _ in got[-2:])  # layer4 runs 8 groups
