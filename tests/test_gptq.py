"""GPTQ: the library's loop against a plain re-statement of the published algorithm, and its effect on models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwt
from qwt.errors import InputError
from qwt.ptq import PTQConfig
from qwt.ptq.baselines import GPTQ
from qwt.ptq.baselines.gptq import gptq_layer
from qwt.quant.gptq import hessian_update, layer_columns
from qwt.quant.modules import QuantConv2d, QuantLinear, quant_modules
from qwt.quant.quantizers import RoundingQuantizer, UniformQuantizer, search_uniform


def plain_gptq(weight, hessian, delta, zero, levels, damp, block_size, act_order):
    """GPTQ's fasterquant loop for one 2-D weight, as published, in FP64; ``delta``/``zero`` per weight."""
    W, H = weight.double().clone(), hessian.clone()
    delta, zero = delta.double(), zero.double()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H, delta, zero = W[:, perm], H[perm][:, perm], delta[:, perm], zero[:, perm]
    H[range(n), range(n)] += damp * torch.mean(torch.diag(H))
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w / delta[:, i1 + i]) + zero[:, i1 + i], 0, levels - 1)
            q = (q - zero[:, i1 + i]) * delta[:, i1 + i]
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q


def _layer(inputs: int, outputs: int, bits: int, seed: int) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear(nn.Linear(inputs, outputs), None, RoundingQuantizer(bits, channel_axis=0))
    layer.weight_quantizer.enabled = True
    layer.quantized_weight()  # calibrate the per-channel grid on the weight, as the PTQ pass does
    return layer


def _batches(inputs: int, seed: int, dead: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(inputs, generator=g) * 2  # uneven input scales make the Hessian's diagonal matter
    batches = [torch.randn(3, 40, inputs, generator=g) * scale for _ in range(4)]
    if dead is not None:
        for x in batches:
            x[..., dead] = 0
    return batches


def _plain_hessian(batches: list[torch.Tensor]) -> torch.Tensor:
    H = torch.zeros(batches[0].shape[-1], batches[0].shape[-1], dtype=torch.float64)
    for x in batches:
        x = x.reshape(-1, x.shape[-1]).double()
        H += 2 * x.T.matmul(x)
    return H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_equals_a_plain_restatement_of_the_published_loop(act_order, group_size):
    inputs, bits = 300, 3  # 300 columns: two full lazy batches of 128 and a partial one
    layer = _layer(inputs, 24, bits, seed=0)
    batches = _batches(inputs, seed=1)
    hessian = None
    for x in batches:
        hessian = hessian_update(hessian, layer_columns(layer, x))
    plain_h = _plain_hessian(batches)
    assert torch.equal(hessian[0], plain_h)

    w = layer.weight.detach().clone()
    if group_size is None:
        delta = layer.weight_quantizer.delta.expand_as(w)
        zero = layer.weight_quantizer.zero_point.expand_as(w)
    else:  # static groups: the weight quantiser's own search on each group of columns of the original weight
        deltas, zeros = [], []
        for start in range(0, inputs, group_size):
            part = w[:, start:start + group_size]
            d, z = search_uniform(part, bits, "affine")
            deltas.append(d[:, None].expand_as(part))
            zeros.append(z[:, None].expand_as(part))
        delta, zero = torch.cat(deltas, 1), torch.cat(zeros, 1)
    expected = plain_gptq(w, plain_h, delta, zero, 2**bits, 0.01, 128, act_order)

    rtn = layer.weight_quantizer(w)
    gptq_layer(layer, hessian, GPTQ(act_order=act_order, group_size=group_size))
    assert torch.equal(layer.weight, w)  # the float weight stays
    assert torch.equal(layer.weight_quantizer(layer.weight), expected.float())  # the quantiser gives GPTQ's
    if group_size is not None:
        assert torch.equal(layer.weight_quantizer.delta, delta) and torch.equal(layer.weight_quantizer.zero_point, zero)
    else:
        assert not torch.equal(layer.weight_quantizer(w), rtn)  # and it is not round-to-nearest


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_columns_are_what_the_conv_multiplies(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 8, 9, 9)
    cols = layer_columns(conv, x)  # (G, N·L, C/G·9)
    w = conv.weight.reshape(groups, 16 // groups, -1)
    out = torch.matmul(cols, w.transpose(1, 2))  # (G, N·L, out/G)
    reference = F.conv2d(x, conv.weight, None, 2, 1, 1, groups)  # (N, out, 5, 5)
    reference = reference.reshape(2, groups, 16 // groups, 25).permute(1, 0, 3, 2).reshape(groups, 50, -1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_a_dead_input_channel_stays_finite():
    layer = _layer(40, 12, 4, seed=2)
    hessian = None
    for x in _batches(40, seed=3, dead=7):
        hessian = hessian_update(hessian, layer_columns(layer, x))
    assert hessian[0, 7, 7] == 0
    gptq_layer(layer, hessian, GPTQ())
    quantized = layer.weight_quantizer(layer.weight)
    assert torch.isfinite(quantized).all()
    zero_code = UniformQuantizer.fake_quant(layer.weight_quantizer, torch.zeros_like(layer.weight))[:, 7]
    assert torch.equal(quantized[:, 7], zero_code)  # the dead column holds the grid's image of 0


def _fmnist_calib() -> torch.Tensor:
    from qwt.data.fashion_mnist import load_fashion_mnist, normalize

    return normalize(load_fashion_mnist("train")[0][:32])


def _layer_inputs(model: nn.Module, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every weight layer's GEMM input columns, as the quantised model produces them."""
    seen: dict[str, torch.Tensor] = {}
    names = {m: name for name, m in quant_modules(model) if isinstance(m, (QuantLinear, QuantConv2d))}

    def keep(module: nn.Module, args: tuple) -> None:
        seen.setdefault(names[module], layer_columns(module, module.input_quantizer(args[0])))

    hooks = [m.register_forward_pre_hook(keep) for m in names]
    with torch.no_grad():
        model(data)
    for hook in hooks:
        hook.remove()
    return seen


def _output_error(layer: nn.Module, fp_weight: torch.Tensor, columns: torch.Tensor) -> float:
    groups = columns.shape[0]
    diff = (layer.weight_quantizer(layer.weight) - fp_weight).detach().reshape(groups, fp_weight.shape[0] // groups, -1)
    return float(torch.matmul(columns.double(), diff.double().transpose(1, 2)).pow(2).sum())


@pytest.mark.parametrize("model_name", ["vit_fmnist", "efficientnet"])
def test_gptq_beats_round_to_nearest_on_every_layer(model_name):
    """Weights only (A16), the same per-channel grid: only the rounding differs. Each layer's output error is
    measured on the inputs GPTQ fitted it to (produced by the GPTQ-rounded layers before it)."""
    if model_name == "vit_fmnist":
        fp, data = qwt.create_model("vit_fmnist"), _fmnist_calib()
    else:  # depthwise (grouped) and pointwise convs; random weights, eval-mode BatchNorm
        import timm

        torch.manual_seed(0)
        fp = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
        data = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # ≥ 2×2 maps in the last stage
    gptq = qwt.quantize(copy.deepcopy(fp), data,
                        PTQConfig(baseline=GPTQ(activations="percentile"), w_bits=3, a_bits=16))
    rtn = qwt.quantize(copy.deepcopy(fp), data, PTQConfig(baseline="percentile", w_bits=3, a_bits=16))
    fp_weights = dict(fp.named_parameters())
    inputs = _layer_inputs(gptq, data)
    rtn_layers = dict(quant_modules(rtn))
    worse = []
    for name, columns in inputs.items():
        layer, fp_w = dict(quant_modules(gptq))[name], fp_weights[f"{name}.weight"]
        assert torch.equal(rtn_layers[name].weight_quantizer.delta, layer.weight_quantizer.delta)  # same grid
        e_gptq, e_rtn = _output_error(layer, fp_w, columns), _output_error(rtn_layers[name], fp_w, columns)
        if not e_gptq < e_rtn:
            worse.append((name, e_gptq, e_rtn))
    assert len(inputs) > 10 and not worse


def test_act_order_and_groups_change_the_result_and_keep_it_valid(tmp_path):
    fp, data = qwt.create_model("vit_fmnist"), _fmnist_calib()
    weights = {}
    for options in (GPTQ(), GPTQ(act_order=True), GPTQ(group_size=32), GPTQ(act_order=True, group_size=32)):
        config = PTQConfig(baseline=options, w_bits=3, a_bits=4)
        model = qwt.quantize(copy.deepcopy(fp), data, config)
        layers = dict(quant_modules(model))
        for name, layer in layers.items():
            if isinstance(layer, (QuantLinear, QuantConv2d)):
                q = layer.weight_quantizer
                quantized = q(layer.weight)
                codes = torch.round(quantized / q.delta) + q.zero_point
                assert torch.isfinite(quantized).all() and codes.min() >= 0 and codes.max() <= q.levels - 1, name
                assert torch.equal((codes - q.zero_point) * q.delta, quantized), name  # on the grid
                if options.group_size and layer.weight.shape[1] > 32:
                    assert q.delta.shape == layer.weight.shape  # one grid per row and group of 32 columns
                    assert not torch.equal(q.delta[:, :32], q.delta[:, 32:64])
        fc2 = layers["blocks.2.mlp.fc2"]
        weights[options] = fc2.weight_quantizer(fc2.weight).detach().clone()
        if options.group_size and options.act_order:
            saved = qwt.save_quantized(model, tmp_path / "gptq", "vit_fmnist", config)
            with torch.no_grad():
                assert torch.equal(qwt.load_quantized(saved)(data), model(data))
    default = weights.pop(GPTQ())
    for options, w in weights.items():
        assert not torch.equal(w, default), options


def test_gptq_options_are_checked():
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1)
    with pytest.raises(ValueError, match="group_size"):
        GPTQ(group_size=0)
    with pytest.raises(ValueError, match="unknown PTQ method"):
        GPTQ(activations="nope")
    with pytest.raises(ValueError, match="LayerNorm → Linear pairs"):
        qwt.quantize(qwt.create_model("resnet18", smoke=True, num_classes=4), torch.zeros(2, 3, 32, 32),
                     PTQConfig(baseline=GPTQ(activations="repq_vit")))


def test_quantisation_off_gives_the_float_model_back():
    """QwT fits each block towards its output with quantisation off: GPTQ must leave the float weights in place."""
    fp, data = qwt.create_model("vit_fmnist"), _fmnist_calib()
    model = qwt.quantize(copy.deepcopy(fp), data, PTQConfig(baseline="gptq", w_bits=3, a_bits=16))
    with torch.no_grad():
        quantized = model(data)
        with qwt.quant_state(model, weight=False, act=False):
            # Up to the quantised attention's op order (see qwt.quant.attention).
            torch.testing.assert_close(model(data), fp(data), rtol=1e-5, atol=1e-5)
    assert (quantized - fp(data)).abs().max() > 1e-2


def _codes(layer: nn.Module) -> torch.Tensor:
    """The integer codes of a layer's quantised weight on its quantiser's grid."""
    q = layer.weight_quantizer
    return torch.round(q(layer.weight).detach() / q.delta) + q.zero_point


def test_symmetric_gptq_uses_every_code_of_the_published_grid(tmp_path):
    """symmetric=True: z = L/2 and Δ = 2·m/(L − 1) for the m = max(|lo|, |hi|) of one of the search's percentile
    pairs (published GPTQ's symmetric grid), not m/(L/2 − 1), which leaves code 0 to clipped values; the
    rounded weights are on the grid, every code of a 3-bit layer is used, and the model saves and loads."""
    from qwt.quant.percentile import PERCENTILES, row_quantiles

    config = PTQConfig(baseline=GPTQ(symmetric=True), w_bits=3, a_bits=4)
    data = _fmnist_calib()
    model = qwt.quantize(qwt.create_model("vit_fmnist"), data, config)
    layers = [(n, m) for n, m in quant_modules(model) if isinstance(m, (QuantLinear, QuantConv2d))]
    k = len(PERCENTILES)
    for name, layer in layers:
        q = layer.weight_quantizer
        assert q.grid == "symmetric_full" and torch.equal(q.zero_point, torch.full_like(q.zero_point, q.levels // 2))
        rows = layer.weight.detach().flatten(1)
        quantiles = row_quantiles(rows, [1.0 - p for p in PERCENTILES] + list(PERCENTILES))
        steps = 2 * torch.maximum(quantiles[:, :k].abs(), quantiles[:, k:].abs()) / (q.levels - 1)
        assert (steps == q.delta.reshape(-1, 1)).any(1).all(), name
        codes = _codes(layer)
        assert codes.min() >= 0 and codes.max() <= q.levels - 1, name
        assert torch.equal((codes - q.zero_point) * q.delta, q(layer.weight)), name  # on the grid
        if q.n_bits == 3:
            assert codes.unique().tolist() == list(range(8)), name
    assert sum(layer.weight_quantizer.n_bits == 3 for _, layer in layers) > 10
    saved = qwt.save_quantized(model, tmp_path / "symmetric", "vit_fmnist", config)
    with torch.no_grad():
        assert torch.equal(qwt.load_quantized(saved)(data), model(data))


def test_the_hessian_is_taken_from_the_quantised_inputs(monkeypatch):
    """Every layer's H accumulates the columns of its input *after* its input quantiser (what the layer
    multiplies), not of the raw input: with A4 activations the two differ on every layer."""
    import qwt.ptq.baselines.gptq as gptq_module

    collect, update = gptq_module._collect_hessian, gptq_module.hessian_update
    columns: list[torch.Tensor] = []
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def spy_collect(layer, stop_at, runs):
        calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of the layer's input quantiser
        hook = layer.input_quantizer.register_forward_hook(lambda m, args, out: calls.append((args[0], out)))
        columns.clear()
        try:
            hessian = collect(layer, stop_at, runs)
        finally:
            hook.remove()
        raw, quantized = calls[0]  # one calibration batch; its first call is the collecting hook's
        seen[layer] = raw, quantized, columns[0]
        return hessian

    def spy_update(hessian, cols):
        columns.append(cols.clone())
        return update(hessian, cols)

    monkeypatch.setattr(gptq_module, "_collect_hessian", spy_collect)
    monkeypatch.setattr(gptq_module, "hessian_update", spy_update)
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _fmnist_calib(),
                         PTQConfig(baseline=GPTQ(), w_bits=4, a_bits=4))
    names = {layer: name for name, layer in quant_modules(model)}
    assert len(seen) > 10
    for layer, (raw, quantized, cols) in seen.items():
        name = names[layer]
        assert torch.equal(cols, layer_columns(layer, quantized)), name
        assert not torch.equal(cols, layer_columns(layer, raw)), name


def test_non_finite_calibration_data_is_named_not_blamed_on_the_damping():
    """Weights only (A16) there is no activation quantiser to notice a NaN image; GPTQ's Hessian would then fail
    its Cholesky factorisation and advise more damping. A tensor is refused before any compute; data the
    library cannot inspect (a custom forward over batches) is refused at the first non-finite Hessian."""
    data = _fmnist_calib()
    data[3, 0, 5, 5] = float("nan")
    config = PTQConfig(baseline=GPTQ(), w_bits=4, a_bits=16)
    model = qwt.create_model("vit_fmnist")
    with pytest.raises(InputError, match=r"^calibration inputs hold 1 NaN or Inf value\(s\)"):
        qwt.quantize(model, data, config)
    assert not list(quant_modules(model))  # refused before the model was touched
    batches = list(data.split(8))
    with pytest.raises(InputError, match="GPTQ, layer patch_embed.proj: its calibration inputs hold NaN or Inf"):
        qwt.quantize(model, batches, config, forward=lambda m, bs: [m(b) for b in bs])


def test_rounding_codes_stay_on_the_grid_when_the_weight_moves():
    """QwT* fine-tunes the float weights under frozen quantisers: a GPTQ offset set for the original weight,
    added to round-to-nearest's code of a moved weight, could leave 0..L−1 (the 8-bit head reached code 256).
    The sum is clamped; for the weights GPTQ rounded it is in range already, so nothing changes bit for bit."""
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _fmnist_calib(),
                         PTQConfig(baseline=GPTQ(), w_bits=4, a_bits=4))
    for name, layer in quant_modules(model):
        if not isinstance(layer, (QuantLinear, QuantConv2d)):
            continue
        q, w = layer.weight_quantizer, layer.weight.detach()
        unclamped = q.codes(w) + q.offset.to(w.dtype)  # GPTQ's codes, as the quantiser computed them before the clamp
        assert unclamped.min() >= 0 and unclamped.max() <= q.levels - 1, name
        expected = (unclamped - q.zero_point) * q.delta
        assert torch.equal(q(w), expected), name
        assert torch.equal(q(w.clone().requires_grad_()).detach(), expected), name  # the training path too

    head = model.head
    q, levels = head.weight_quantizer, head.weight_quantizer.levels
    assert q.n_bits == 8 and (q.offset > 0).any() and (q.offset < 0).any()
    (r_up, c_up), (r_down, c_down) = (q.offset > 0).nonzero()[0].tolist(), (q.offset < 0).nonzero()[0].tolist()
    moved = head.weight.detach().clone()
    moved[r_up, c_up] = (levels - 1 - q.zero_point[r_up, 0] + 2) * q.delta[r_up, 0]  # two steps past the top
    moved[r_down, c_down] = (-q.zero_point[r_down, 0] - 2) * q.delta[r_down, 0]  # two steps below the bottom
    for weight in (moved, moved.clone().requires_grad_()):
        out = q(weight).detach()
        codes = torch.round(out / q.delta) + q.zero_point
        assert codes.min() >= 0 and codes.max() <= levels - 1
        assert codes[r_up, c_up] == levels - 1 and codes[r_down, c_down] == 0


def test_gptq_reports_the_published_loss_and_the_output_errors_of_gptq_and_round_to_nearest():
    """loss = Σ err²/2 is tr(D (H + λI) Dᵀ)/2 for D = W − Q (λ: the damping), i.e. the output error plus λ‖D‖²/2:
    it cannot fail. Output errors are checked against ‖X Dᵀ‖² computed from the inputs; GPTQ below RTN on these
    strongly correlated inputs is the property GPTQ is for (not a theorem; deterministic here)."""
    inputs, layer = 96, _layer(96, 16, 3, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, inputs, generator=g) + 0.1 * torch.randn(400, inputs,
                                                                                                  generator=g)
    hessian = hessian_update(None, layer_columns(layer, x))
    w = layer.weight.detach().clone()
    rtn = layer.weight_quantizer(w)
    stats = gptq_layer(layer, hessian, GPTQ(damp=0.05))
    q = layer.weight_quantizer(w)
    damping = 0.05 * hessian[0].diagonal().mean()
    d = (w - q).double()
    assert stats["gptq_loss"] == pytest.approx(stats["output_error"] + damping * d.square().sum() / 2, rel=1e-6)
    assert stats["output_error"] == pytest.approx(float((x.double() @ d.T).square().sum()), rel=1e-5)
    assert stats["output_error_rtn"] == pytest.approx(float((x.double() @ (w - rtn).double().T).square().sum()),
                                                      rel=1e-5)
    assert stats["output_norm"] == pytest.approx(float((x.double() @ w.double().T).square().sum()), rel=1e-9)
    assert stats["output_error"] < 0.5 * stats["output_error_rtn"]


def _tiny_lm() -> nn.Module:
    from qwt.models.decoder_lm import build_from_config, tiny_config

    torch.manual_seed(0)
    return build_from_config(config=tiny_config("llama"))


@pytest.mark.parametrize("batched", [False, True])
def test_the_block_walk_gives_a_decoder_lm_the_codes_of_the_forward_walk(monkeypatch, batched):
    """The same inputs reach every layer whether GPTQ runs one decoder layer on its stored inputs or a partial
    forward of the whole model per layer: the codes and statistics are equal bit for bit, and the walk embeds
    each batch once instead of once per layer."""
    from qwt.ptq.baselines import gptq as gptq_module
    from qwt.tasks.llm.task import parse_bits

    fp, config = _tiny_lm(), parse_bits("W4A8", "gptq")
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    data = qwt.ptq.Batches(ids.split(2)) if batched else ids
    embeds = fp.get_input_embeddings()
    results = []
    for walk in (True, False):
        if not walk:
            monkeypatch.setattr(gptq_module, "_covering_plan", lambda model: None)
        model = copy.deepcopy(fp)
        calls = []
        model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
        qwt.quantize(model, ids[:1], config, post_calibration_data=data)  # calibration: 1 call, then GPTQ's
        results.append((model.state_dict(), gptq_module.gptq_layers(model), len(calls) - 1))
    (walked, walk_stats, walk_calls), (forward, forward_stats, forward_calls) = results
    assert walked.keys() == forward.keys() and all(torch.equal(walked[k], forward[k]) for k in walked)
    assert walk_stats == forward_stats and len(walk_stats) == 14  # 7 Linear layers per decoder layer
    batches = 2 if batched else 1
    assert walk_calls == batches and forward_calls == batches * (1 + 14)  # the layer order, then each layer
    codes = [m.weight_quantizer.offset for _, m in quant_modules(model) if isinstance(m, QuantLinear)]
    assert any(c.abs().sum() > 0 for c in codes)  # GPTQ moved codes away from round-to-nearest


def test_gptq_on_a_vision_model_keeps_the_per_layer_forward():
    """A ViT's patch embedding and head lie outside its blocks: no block walk (which would feed them other
    inputs), the per-layer forward as before."""
    from qwt.ptq.baselines import gptq as gptq_module

    model = qwt.create_model("vit_fmnist")
    qwt.quantize(model, _fmnist_calib()[:4], qwt.PTQConfig(baseline="gptq", w_bits=4, a_bits=8))
    assert gptq_module._covering_plan(model) is None
    assert "patch_embed.proj" in gptq_module.gptq_layers(model)
