"""QwT on decoder-only language models: tiny random Llama and Qwen2 configs built by transformers (no downloads),
the held-out guard, save/load, the perplexity routine, the command line's refusals and one end-to-end run."""
import copy
import json
import math

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # the language-model extra (requirements-llm.txt), installed by scripts/install.sh

import qwt
from qwt.cli import LOCK_FILE
from qwt.compensation import BlockPlan, Step, fit_compensation
from qwt.models.decoder_lm import build_from_config, config_dict, tiny_config
from qwt.ptq.baselines import GPTQ, RTN, act_quantizer
from qwt.quant.modules import QuantLinear, quant_state
from qwt.quant.rtn import MinMaxWeightQuantizer, TokenQuantizer
from qwt.report import results_table
from qwt.tasks import llm, protocol
from qwt.tasks.llm import task as llm_task
from qwt.tasks.memory import PeakMemory

W4A8 = qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=8)


def _lm(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_from_config(config=tiny_config(model_type))


def _ids(n: int, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _layer_errors(model, fp, ids):
    """Per decoder layer, on the compensated quantised stream of ``ids``: ‖FP layer − layer as run‖² with the
    compensation and without it (the quantised block alone)."""
    plan = qwt.family_of(model).plan(model)
    x, out = plan.stem(ids), []
    for step in plan.steps:
        module = model.get_submodule(step.path)
        y_fp = step.run(fp.get_submodule(step.path), x)
        y = step.run(module, x)
        y_q = step.run(module.block, x)
        out.append(((y_fp - y).pow(2).sum().item(), (y_fp - y_q).pow(2).sum().item()))
        x = y
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_rtn_plus_qwt_lowers_every_layers_error_on_unseen_windows(model_type):
    fp = _lm(model_type)
    model = plain_ptq(fp)
    reports = qwt.apply_qwt(model, _ids(32, seed=2), qwt.QwTConfig(fp16_eval=False), batch_size=4, progress=False)
    assert [r.path for r in reports] == ["model.layers.0", "model.layers.1"] and all(r.applied for r in reports)
    with torch.no_grad():
        errors = _layer_errors(model, fp, _ids(8, seed=3))  # windows the fit never saw
        for compensated, plain in errors:
            assert compensated < plain
        ids = _ids(8, seed=3)
        ref = fp(ids).logits
        assert (model(ids).logits - ref).pow(2).mean() < (plain_ptq(fp)(ids).logits - ref).pow(2).mean()


def plain_ptq(fp):
    return qwt.quantize(copy.deepcopy(fp), _ids(4), W4A8)


def test_quantisation_off_gives_the_fp_model_back():
    fp = _lm("qwen2")
    model = plain_ptq(fp)
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        assert torch.equal(model(_ids(2)).logits, fp(_ids(2)).logits)
    assert {type(m.input_quantizer).__name__ for m in model.modules() if isinstance(m, QuantLinear)} == \
        {"TokenQuantizer"}
    assert not isinstance(model.lm_head, QuantLinear)


def test_guard_leaves_out_a_compensation_that_raises_the_held_out_error():
    """A block whose quantisation error is input-rounding noise (3-bit inputs): a least-squares map fits part of
    it in sample (R² > 0, so the authors' gate keeps it) but cannot predict it on other rows, where it adds error."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(QuantLinear(torch.nn.Linear(16, 16), act_quantizer(3), MinMaxWeightQuantizer(8)))
    x = torch.randn(4, 24, 16, generator=torch.Generator().manual_seed(5))  # 4 batches of 24 rows, 17 unknowns

    def fit(guard: float):
        model = copy.deepcopy(block)
        qwt.calibrate(model, x[0])
        # The stem takes feature rows (N, rows, 16), not images or token ids: the plan says what it accepts.
        plan = BlockPlan(stem=lambda b: b, steps=[Step("0")], form="linear", check_inputs=lambda b, what: b)
        return fit_compensation(model, plan, x, qwt.QwTConfig(guard_fraction=guard, fp16_eval=False),
                                batch_size=1, progress=False)[0]

    plain, guarded = fit(0.0), fit(0.25)
    assert plain.applied and plain.r2 > 0 and "guard" not in plain.extra
    g = guarded.extra["guard"]
    assert g["heldout_batches"] == 1 and g["heldout_error_compensated"] > g["heldout_error"]
    assert not g["kept"] and not guarded.applied


def test_guard_keeps_the_layers_of_a_tiny_llama_and_reports_each_decision():
    fp = _lm("llama")
    model = qwt.quantize(copy.deepcopy(fp), _ids(4), W4A8)
    reports = qwt.apply_qwt(model, _ids(32, seed=2), qwt.QwTConfig(guard_fraction=0.25, fp16_eval=False),
                            batch_size=4, progress=False)
    for r in reports:
        g = r.extra["guard"]
        assert g["heldout_batches"] == 2 and g["kept"] == r.applied
        assert g["kept"] == (g["heldout_error_compensated"] < g["heldout_error"])


@pytest.mark.parametrize("form", ["dense", "channelwise"])
def test_removing_every_compensation_gives_the_ptq_model_back(form):
    fp = _lm("llama")
    model = plain_ptq(fp)
    reports = qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(fp16_eval=False, compensation=form),
                            batch_size=4, progress=False)
    ids = _ids(2, seed=3)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, plain_ptq(fp)(ids).logits)
        for r in reports:
            qwt.compensation.remove_compensation(model, r.path)
        assert torch.equal(model(ids).logits, plain_ptq(fp)(ids).logits)
    assert not any(isinstance(m, (qwt.compensation.Compensated, qwt.compensation.ChannelAffine))
                   for m in model.modules())


def _heldout_perplexity(held):
    return lambda model: llm.perplexity(llm.score_windows(model, held, 4, "cpu", shard=False))


def test_model_guard_keeps_the_baseline_when_every_depth_is_worse():
    """Compensations scaled up 50×: each depth the guard tries is worse than the baseline on the held-out
    windows, so the baseline itself comes back and the decision lists every depth tried."""
    fp = _lm("llama")
    base, model = plain_ptq(fp), plain_ptq(fp)
    reports = qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(fp16_eval=False), batch_size=4, progress=False)
    with torch.no_grad():
        for r in reports:
            module = model.get_submodule(r.path)
            module.comp_weight.mul_(50)
            module.comp_bias.add_(50)
    score = _heldout_perplexity(_ids(8, seed=4))
    base_ppl = score(base)
    kept, decision = qwt.compensation.model_guard(base, model, reports, score, base_ppl)
    assert kept is base and decision["depth"] == 0 and not decision["kept"]
    assert not any(r.applied for r in reports) and all(r.extra["dropped_by_model_guard"] for r in reports)
    assert set(decision["heldout_score_by_depth"]) == {"1", "2"}  # L = 2: depths 2 and round(2·2/4) = 1
    assert all(v > base_ppl for v in decision["heldout_score_by_depth"].values())


def test_model_guard_keeps_the_best_depth_below_the_baseline(tmp_path):
    """Only the last layer's compensation is corrupted: the guard keeps the first layer's (if that beats the
    baseline on the held-out windows) and never returns a model worse there than the baseline."""
    fp = _lm("llama")
    base, model = plain_ptq(fp), plain_ptq(fp)
    reports = qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(fp16_eval=False), batch_size=4, progress=False)
    with torch.no_grad():
        model.get_submodule(reports[1].path).comp_bias.add_(50)
    held = _ids(8, seed=4)
    score = _heldout_perplexity(held)
    base_ppl = score(base)
    kept, decision = qwt.compensation.model_guard(base, model, reports, score, base_ppl)
    tried = decision["heldout_score_by_depth"]
    assert tried["2"] > base_ppl and decision["depth"] == (1 if tried["1"] < base_ppl else 0)
    got = score(kept)
    assert got == (tried["1"] if decision["depth"] else base_ppl) and got <= base_ppl
    assert isinstance(kept.get_submodule(reports[1].path), type(base.get_submodule(reports[1].path)))
    qwt.save_quantized(kept, tmp_path / "saved", "hf_causal_lm", W4A8, {"config": config_dict(fp)})
    with torch.no_grad():  # a model with some layers compensated and some not saves and reloads bit-identically
        assert torch.equal(qwt.load_quantized(tmp_path / "saved")(held).logits, kept(held).logits)


def test_guard_needs_batches_to_fit_and_to_hold_out():
    with pytest.raises(ValueError, match="guard_fraction must be in"):
        qwt.QwTConfig(guard_fraction=1.0)
    model = qwt.quantize(_lm("llama"), _ids(4), W4A8)
    with pytest.raises(ValueError, match="needs batches both to fit and to hold out"):
        qwt.apply_qwt(model, _ids(4), qwt.QwTConfig(guard_fraction=0.25), batch_size=4, progress=False)


@pytest.mark.parametrize("model_type,config", [
    ("llama", W4A8),
    ("qwen2", qwt.PTQConfig(baseline="rtn", w_bits=3, a_bits=16)),
    ("llama", qwt.PTQConfig(baseline=RTN(group_size=32, activations="tensor"), w_bits=4, a_bits=6)),
    ("llama", qwt.PTQConfig(baseline=GPTQ(activations="rtn"), w_bits=4, a_bits=8)),
    ("gpt2", W4A8),  # its Conv1D layers are rebuilt as the same Linear layers
    ("gemma3_text", W4A8),
])
def test_save_load_round_trip_is_bit_identical(tmp_path, model_type, config):
    fp = _lm(model_type)
    model = qwt.quantize(copy.deepcopy(fp), _ids(4), config)
    qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(fp16_eval=False, guard_fraction=0.25), batch_size=4,
                  progress=False)
    with torch.no_grad():
        logits = model(_ids(4, seed=3)).logits
    qwt.save_quantized(model, tmp_path / "m", "hf_causal_lm", config, {"config": tiny_config(model_type)})
    loaded = qwt.load_quantized(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(_ids(4, seed=3)).logits, logits)
    assert qwt.model_size_mb(loaded) == qwt.model_size_mb(model)


def test_channelwise_lm_compensation_corrects_the_branch_ends():
    # Saving and loading it: tests/test_saved_channelwise.py.
    model = plain_ptq(_lm("llama"))
    reports = qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(compensation="channelwise"), batch_size=4,
                            progress=False)
    assert any(r.applied for r in reports)
    assert all(set(r.extra["r2_per_layer"]) == {"self_attn.o_proj", "mlp.down_proj"} for r in reports)


def test_tied_embedding_counts_once_in_the_size():
    fp = _lm("llama")
    assert fp.lm_head.weight is fp.model.embed_tokens.weight
    unique = sum(p.numel() for p in fp.parameters())  # parameters() yields a shared tensor once
    assert qwt.model_size_mb(fp) == unique * 4 // 1 / 1e6


def test_rtn_quantisers_match_their_definition():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    q = MinMaxWeightQuantizer(4, group_size=32)
    q.enabled = True
    out = q(w)
    for row in range(6):
        for g in range(2):
            block = w[row, 32 * g:32 * (g + 1)]
            lo, hi = min(block.min(), 0), max(block.max(), 0)
            delta = (hi - lo) / 15
            z = torch.round(-lo / delta)
            expected = (torch.clamp(torch.round(block / delta) + z, 0, 15) - z) * delta
            assert torch.equal(out[row, 32 * g:32 * (g + 1)], expected)
        assert out[row].unique().numel() <= 32
    t = TokenQuantizer(4)
    t.enabled = True
    x = torch.randn(3, 5, 64)
    y = t(x)
    assert all(y[i, j].unique().numel() <= 16 for i in range(3) for j in range(5))
    assert torch.equal(t(x[:1, :2]), y[:1, :2])  # per token: other tokens do not change a token's grid


def test_perplexity_equals_a_plain_restatement():
    fp = _lm("llama")
    windows = _ids(5, 24, seed=4)
    scores = llm.score_windows(fp, windows, batch_size=2, device="cpu")
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(fp(w[None]).logits[0].double(), -1)
            nll -= sum(logp[t - 1, w[t]].item() for t in range(1, len(w)))
            count += len(w) - 1
    # FP32 cross-entropy summed per batch vs FP64 per token: agree to FP32 rounding of sums of ~100 terms.
    assert math.isclose(llm.perplexity(scores), math.exp(nll / count), rel_tol=1e-5)
    assert scores.tokens == count
    model = qwt.quantize(copy.deepcopy(fp), _ids(4), qwt.PTQConfig(baseline="rtn", w_bits=2, a_bits=4))
    q = llm.score_windows(model, windows, batch_size=5, device="cpu")
    with torch.no_grad():
        same = (model(windows).logits[:, :-1].argmax(-1) == fp(windows).logits[:, :-1].argmax(-1))
    assert llm.agreement(q, scores) == 100.0 * int(same.sum()) / same.numel()


@pytest.mark.parametrize("tag,method,expected", [
    ("W4A8", "rtn", RTN(group_size=None, activations="token")),
    ("W3A16", "rtn", RTN()),
    ("W4A8", "gptq", GPTQ(activations="rtn")),
])
def test_bit_tags(tag, method, expected):
    config = llm.parse_bits(tag, method)
    assert config.baseline == expected and config.tag == tag
    assert (config.w_bits, config.a_bits) == (int(tag[1]), int(tag[3:]))


def _settings(*argv: str) -> list[qwt.PTQConfig]:
    task = llm.LanguageModel()
    return task.settings(protocol.parse_args(task, "", list(argv)))


@pytest.mark.parametrize("argv,expected", [
    # what the tags W4g128A6-static, W4g128A8 (gptq) and W4A8-static stood for, now the baseline's options
    (["--bits", "W4A6", "--method-option", "group_size=128", "--method-option", "activations=tensor"],
     qwt.PTQConfig(baseline=RTN(group_size=128, activations="tensor"), w_bits=4, a_bits=6)),
    (["--bits", "W4A8", "--method", "gptq", "--method-option", "group_size=128"],
     qwt.PTQConfig(baseline=GPTQ(group_size=128, activations="rtn"), w_bits=4, a_bits=8)),
    (["--bits", "W4A8", "--method-option", "activations=tensor"],
     qwt.PTQConfig(baseline=RTN(activations="tensor"), w_bits=4, a_bits=8)),
])
def test_method_options_give_the_configs_of_the_old_tag_suffixes(argv, expected):
    assert _settings(*argv) == [expected]


@pytest.mark.parametrize("tag", ["W4g128A8", "W4A8-static", "W4g128A6-static"])
def test_old_tag_suffixes_are_refused_naming_the_method_options(tag):
    with pytest.raises(qwt.errors.InputError, match=f"^--bits '{tag}': .*--method-option activations=tensor, "
                                                    "--method-option group_size=128"):
        _settings("--bits", tag)


@pytest.mark.parametrize("tag,method", [("W4A9", "rtn"), ("W1A8", "rtn"), ("W4A16-static", "rtn"), ("4/8", "rtn"),
                                        ("W4A8x", "rtn"), ("W4g0A8", "rtn"), ("W4A8-static", "gptq")])
def test_unknown_bits_are_refused(tag, method):
    with pytest.raises(qwt.errors.InputError, match="^--bits"):
        llm.parse_bits(tag, method)


@pytest.mark.parametrize("method,options,message", [
    ("gptq", {"activations": "tensor"}, "unknown PTQ method 'tensor'"),
    ("rtn", {"group_size": 0}, "RTN group_size must be ≥ 1"),
    ("repq_vit", None, "RepQ-ViT needs LayerNorm → Linear pairs"),
])
def test_a_bad_baseline_is_named_by_its_own_flags_not_by_bits(method, options, message):
    """These used to read ``--bits W4A8: ...``, pointing at a bit setting that was fine."""
    given = f"--method {method}" + "".join(f" --method-option {k}={v}" for k, v in (options or {}).items())
    with pytest.raises(qwt.errors.InputError) as refused:
        llm.parse_bits("W4A8", method, options)
    assert str(refused.value).startswith(f"{given}: ") and message in str(refused.value)


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    t = Tokenizer(models.WordLevel({"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), "isolated")
    t.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny Llama checkpoint folder with a character tokenizer, and two text files (train / test)."""
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    build_from_config(config=tiny_config("llama", vocab_size=97)).save_pretrained(root / "model")
    _char_tokenizer().save_pretrained(root / "model")
    text = "It was the best of times, it was the worst of times; every word of it true.\n"
    (root / "calib.txt").write_text(text * 40)
    (root / "eval.txt").write_text(text[::-1] * 12)
    return root


def _main(argv, capsys):
    """Exit status and the stderr lines that name a problem (argparse's own refusals add a usage line)."""
    capsys.readouterr()
    try:
        code = llm.main("test", [str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    return code, [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]


def _record(out: Path, stem: str = "model") -> dict:
    """The run's record ``OUT/<stem>.json`` (a local checkpoint folder's run is named for the folder)."""
    return json.loads((out / f"{stem}.json").read_text())


def _rows(record: dict) -> list[tuple]:
    return [(r["bits"], r["baseline"], r["stage"], r["form"]) for r in record["rows"]]


def _files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` but the lock (it names the last run that held the folder)."""
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*"))
            if f.is_file() and f.name != LOCK_FILE}


def test_end_to_end_on_a_local_checkpoint_and_text_files(local_model, tmp_path, capsys):
    out, save = tmp_path / "out", tmp_path / "saved"
    code, err = _main(["--model", local_model / "model", "--calib-text", local_model / "calib.txt", "--eval-text",
                       local_model / "eval.txt", "--window", 32, "--calib-windows", 16, "--batch-size", 4,
                       "--bits", "W4A8", "--out", out, "--save", save, "--continuation-tokens", 5,
                       "--no-progress"], capsys)
    assert code == 0, err
    record = _record(out)
    assert record["complete"] and record["task"] == "llm"
    assert _rows(record) == [("FP", None, "fp", None), ("W4A8", "rtn", "ptq", None), ("W4A8", "rtn", "qwt", "dense"),
                             ("W4A8", "rtn", "qwt", "channelwise")]
    data = record["data"]
    assert data["calibration_windows"] == 16 and data["source"] == "files"
    assert set(data["continuations"]) >= {"FP", "W4A8 rtn", "W4A8 rtn + QwT"}
    assert "threads" in record["environment"] and (out / "model.png").is_file()
    assert "Greedy continuation (5 tokens)" in (out / "model.md").read_text()
    details = json.loads((out / "details" / "model.json").read_text())
    blocks = details["blocks"]["W4A8 rtn dense"]
    assert len(blocks) == 2 and all("guard" in b["extra"] for b in blocks)
    for row in record["rows"][2:]:  # the model-level guard's decision, on held-out calibration windows
        guard = row["output_guard"]
        assert guard["heldout_windows"] == 4 and row["blocks_kept"] <= guard["depth"] <= row["blocks"]
        assert guard["score"] == "perplexity"
        assert (guard["depth"] > 0) == (min(guard["heldout_score_by_depth"].values()) < guard["heldout_score"])
    loaded = qwt.load_quantized(save / "W4A8")
    assert qwt.family_of(loaded).name == "decoder_lm"
    channelwise = qwt.load_quantized(save / "W4A8-channelwise")  # both forms are saved
    assert any(isinstance(m, qwt.compensation.ChannelAffine) for m in channelwise.modules()) or \
        record["rows"][3]["blocks_kept"] == 0
    # rows name only options that differ from the baseline's defaults; the details hold every option
    assert not any("baseline_options" in r for r in record["rows"])
    assert [(c["baseline"], c["baseline_options"]) for c in details["ptq"]] == \
        [("rtn", {"group_size": None, "activations": "token"})]
    code, err = _main(["--model", local_model / "model", "--calib-text", local_model / "calib.txt", "--eval-text",
                       local_model / "eval.txt", "--window", 32, "--calib-windows", 16, "--bits", "W4A8",
                       "--guard-fraction", 0, "--out", tmp_path / "unguarded", "--no-progress"], capsys)
    rows = _record(tmp_path / "unguarded")["rows"]
    assert code == 0 and not any("output_guard" in r for r in rows) and rows[2]["blocks_kept"] == 2


@pytest.mark.parametrize("argv,message", [
    (["--model", "HuggingFaceTB/SmolLM2-135M"], "nor a local folder"),
    (["--bits", "W4A99"], "--bits"),
    (["--calib-text", "/nonexistent.txt", "--eval-text", "/nonexistent.txt"], "no such text file"),
    (["--guard-fraction", "1.5"], "--guard-fraction: must be in [0, 1)"),
    # each of these used to run and leave a row, a continuation or a saved model silently missing or doubled
    (["--bits", "W4A8", "W3A16", "W4A8"], "bit setting W4A8 rtn given more than once"),
    (["--forms", "dense", "dense"], "QwT form dense given more than once"),
    (["--bits", "W3A16", "--continuation-bits", "W4A8"], "--continuation-bits W4A8: not one of this run's --bits"),
    (["--calib-windows", "2"], "--ptq-windows 4: PTQ calibrates on the first of the 2"),
    (["--wikitext2", "/tmp", "--calib-text", __file__, "--eval-text", __file__], "--wikitext2 and --calib-text"),
    (["--feature-device", "cuda:99"], "--feature-device cuda:99"),
    (["--method", "gptq", "--method-option", "act_order=no"], "option act_order=no: expected True or False"),
    # the bit tag's suffixes are gone: their settings are the baseline's options (their other refusals: above)
    (["--method", "gptq", "--method-option", "activations=tensor"],
     "--method gptq --method-option activations=tensor: unknown PTQ method 'tensor'"),
    (["--bits", "W4g64A8", "--method-option", "group_size=32"], "--method-option group_size=128"),
    (["--method", "repq_vit"], "RepQ-ViT needs LayerNorm → Linear pairs"),
    (["--propagation", "1.5"], "compensation flags: propagation (α of the error-propagating target) must be in"),
    (["--relative-ridge", "0.1", "--solver", "reference"], "invalid choice: 'reference'"),
    (["--sink-norm-multiple", "0.5"], "compensation flags: sink_norm_multiple must be > 1"),
])
def test_refusals_before_any_compute(argv, message, tmp_path, capsys):
    argv = [tmp_path / "save" if a == "SAVE" else a for a in argv]
    code, err = _main(argv + ["--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "save").exists()


def test_refusals_that_need_the_model(local_model, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a window.")
    texts = ["--calib-text", local_model / "calib.txt", "--eval-text"]
    base = ["--out", tmp_path / "out", "--no-progress"]
    model = ["--model", local_model / "model"]
    cases = [
        (model + texts + [local_model / "eval.txt", "--window", 4096], "above the model's maximum positions (512)"),
        (model + texts + [short, "--window", 64], "fewer than one window of 64"),
        (model + texts + [local_model / "eval.txt", "--window", 500], "needs batches both to fit and to hold out"),
    ]
    texts.append(local_model / "eval.txt")
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((local_model / "model" / "config.json").read_text())
    cases.append((["--model", no_tok] + texts, "no tokenizer there"))
    mixtral = tmp_path / "mixtral"
    torch.manual_seed(0)
    build_from_config(config=tiny_config("mixtral", vocab_size=97)).save_pretrained(mixtral)
    _char_tokenizer().save_pretrained(mixtral)
    cases.append((["--model", mixtral] + texts, "is a weight of a decoder layer outside its Linear layers"))
    for argv, message in cases:
        code, err = _main(argv + base, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert not (tmp_path / "out").exists()


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = plain_ptq(_lm("llama"))
    comp = _ids(32, seed=2)
    share = comp.shape[0] // world
    reports = qwt.apply_qwt(model, comp[rank * share:(rank + 1) * share],
                            qwt.QwTConfig(guard_fraction=0.25, fp16_eval=False), batch_size=4, progress=False)
    if rank == 0:
        torch.save({"r2": [r.r2 for r in reports], "guard": [r.extra["guard"] for r in reports],
                    "weight": model.model.layers[1].comp_weight.detach()}, out)
    dist.destroy_process_group()


def test_two_gloo_ranks_fit_what_one_process_fits(tmp_path):
    """Each rank fits on its half of the windows (its own held-out batches); the all-reduced statistics, the
    guard's included, give the single process's layer fits and guard decisions."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path / "rank0.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    model = plain_ptq(_lm("llama"))
    reports = qwt.apply_qwt(model, _ids(32, seed=2), qwt.QwTConfig(guard_fraction=0.25, fp16_eval=False),
                            batch_size=4, progress=False)
    for r, r2, guard in zip(reports, got["r2"], got["guard"]):
        assert abs(r.r2 - r2) < 1e-6  # FP64 sums in another order, over FP32 features
        assert guard["kept"] == r.extra["guard"]["kept"] and guard["heldout_batches"] == 1
        assert math.isclose(guard["heldout_error"], r.extra["guard"]["heldout_error"], rel_tol=1e-9)
        assert math.isclose(guard["heldout_error_compensated"], r.extra["guard"]["heldout_error_compensated"],
                            rel_tol=1e-6)
    torch.testing.assert_close(got["weight"], model.model.layers[1].comp_weight.detach(), rtol=1e-4, atol=1e-5)


def _two_rank_task(rank: int, world: int, port: int, argv: list[str]) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    assert llm.main("test", argv) == 0


def test_two_gloo_ranks_run_the_task_as_one_process(local_model, tmp_path):
    """The whole task under 2 ranks (batches of 2 windows each) against one process (batches of 4): the same
    windows are fitted on and held out (rank r takes windows r, r+2, …; the held-out batches interleave back into
    the single process's), so the fits, both halves of the guard and the perplexities agree up to FP64 summation
    order and FP32 kernels on other batch shapes (seen: ≤ 2e-7 relative in perplexity under the default, AVX2
    and AVX-512 kernels; 1e-4 leaves room for an 8-bit activation code that such a difference flips)."""
    import socket

    import torch.multiprocessing as mp

    common = ["--model", local_model / "model", "--calib-text", local_model / "calib.txt", "--eval-text",
              local_model / "eval.txt", "--window", 16, "--calib-windows", 32, "--bits", "W4A8",
              "--continuation-tokens", 2, "--no-progress"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(a) for a in common + ["--batch-size", 2, "--out", tmp_path / "two"]]
    mp.spawn(_two_rank_task, args=(2, port, argv), nprocs=2, join=True)
    assert llm.main("test", [str(a) for a in common + ["--batch-size", 4, "--out", tmp_path / "one"]]) == 0
    two, one = (_record(tmp_path / d) for d in ("two", "one"))
    assert two["data"]["world_size"] == 2 and one["data"]["world_size"] == 1
    for a, b in zip(two["rows"], one["rows"], strict=True):
        assert (a["bits"], a["stage"], a["form"], a.get("blocks_kept")) == \
            (b["bits"], b["stage"], b["form"], b.get("blocks_kept"))
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
        if "output_guard" in b:
            ga, gb = a["output_guard"], b["output_guard"]
            assert ga["depth"] == gb["depth"] and ga["heldout_windows"] == gb["heldout_windows"] == 8
            assert ga["heldout_score"] == pytest.approx(gb["heldout_score"], rel=1e-4)


def test_hidden_states_on_disk_give_the_same_bits(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fp = _lm("qwen2")
    memory, disk = plain_ptq(fp), plain_ptq(fp)
    for model, where in ((memory, None), (disk, "disk")):
        qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(guard_fraction=0.25, feature_device=where),
                      batch_size=4, progress=False)
    a, b = memory.state_dict(), disk.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == []


# -- decoder families ----------------------------------------------------------------------------------------------

#: model type → (where its decoder layers sit, its residual branch ends, quantised layers per decoder layer)
FAMILIES = {
    "llama": ("model.layers", ["self_attn.o_proj", "mlp.down_proj"], 7),
    "qwen2": ("model.layers", ["self_attn.o_proj", "mlp.down_proj"], 7),
    "mistral": ("model.layers", ["self_attn.o_proj", "mlp.down_proj"], 7),
    "gemma3_text": ("model.layers", ["post_attention_layernorm", "post_feedforward_layernorm"], 7),
    "opt": ("model.decoder.layers", ["self_attn.out_proj", "fc2"], 6),
    "gpt2": ("transformer.h", ["attn.c_proj", "mlp.c_proj"], 4),
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_qwt_runs_on_each_decoder_family(model_type):
    """RTN W4A8 → QwT dense and channel-wise: every Linear (GPT-2's Conv1D too) of every decoder layer is
    quantised and the LM head is not, both forms fit every layer at the family's branch ends, and each compensated
    model is closer to the FP model's logits than the baseline on the windows it was fitted on."""
    layers, branches, per_layer = FAMILIES[model_type]
    fp = _lm(model_type)
    base = plain_ptq(fp)
    quantised = [n for n, m in base.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantised) == 2 * per_layer and all(n.startswith(layers + ".") for n in quantised)
    assert not isinstance(base.get_output_embeddings(), QuantLinear)
    fit = _ids(16, seed=2)
    with torch.no_grad():
        ref = fp(fit).logits
        base_error = (base(fit).logits - ref).pow(2).mean()
    for form in ("dense", "channelwise"):
        model = copy.deepcopy(base)
        reports = qwt.apply_qwt(model, fit, qwt.QwTConfig(fp16_eval=False, compensation=form), batch_size=4,
                                progress=False)
        assert [r.path for r in reports] == [f"{layers}.0", f"{layers}.1"] and all(r.applied for r in reports)
        assert form == "dense" or all(list(r.extra["r2_per_layer"]) == branches for r in reports)
        with torch.no_grad():
            logits = model(fit).logits
        assert torch.isfinite(logits).all() and (logits - ref).pow(2).mean() < base_error, form


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_layer_runs_with_the_arguments_the_model_gives_it(model_type):
    """The plan's stem and recorded per-layer calls reproduce every decoder layer's output of the model's own
    forward bit for bit; Gemma 3's local (sliding-window 8 < 32 tokens) and global layers are given different
    masks and rotary embeddings, so a call recorded for the wrong layer would show."""
    from qwt.models.decoder_lm import DecoderContext

    fp = _lm(model_type)
    plan = qwt.family_of(fp).plan(fp)
    outputs = []
    hooks = [fp.get_submodule(s.path).register_forward_hook(
        lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for s in plan.steps]
    ids = _ids(2)
    with torch.no_grad():
        fp(ids)
        for hook in hooks:
            hook.remove()
        x = plan.stem(ids)
        for step, expected in zip(plan.steps, outputs, strict=True):
            x = step.run(fp.get_submodule(step.path), x)
            assert torch.equal(x, expected), step.path
    if model_type == "gemma3_text":
        context = DecoderContext(fp)
        context.stem(ids)
        local, full = (context.calls[(2, 32)][i][1] for i in (0, 1))
        assert local["attention_mask"] is not None and not torch.equal(local["position_embeddings"][0],
                                                                       full["position_embeddings"][0])
        assert full["attention_mask"] is None or not torch.equal(local["attention_mask"], full["attention_mask"])


def test_gpt2_conv1d_is_quantised_as_an_equal_linear():
    """GPT-2's Conv1D (x @ W + b, W stored (in, out)) becomes the nn.Linear with the transposed weight: the same
    outputs bit for bit, so with quantisation off the quantised GPT-2 is the FP model."""
    from transformers.pytorch_utils import Conv1D

    from qwt.models.decoder_lm import linear_from_conv1d

    g = torch.Generator().manual_seed(0)
    conv = Conv1D(48, 16)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(16, 48, generator=g))
        conv.bias.copy_(torch.randn(48, generator=g))
        x = torch.randn(3, 5, 16, generator=g)
        assert torch.equal(linear_from_conv1d(conv)(x), conv(x))
    fp = _lm("gpt2")
    model = plain_ptq(fp)
    assert not any(isinstance(m, Conv1D) for m in model.transformer.h.modules())
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        assert torch.equal(model(_ids(2)).logits, fp(_ids(2)).logits)


def test_llama_layout_is_quantised_and_walked_as_before():
    """SmolLM2's layout: the same 14 Linear layers quantised (by name, in order), the same block paths and branch
    ends as when the family hard-coded ``model.layers`` / ``o_proj`` / ``down_proj``, so its tables' arithmetic
    is unchanged (checked when the accessors replaced the hard-coded names: logits bit-identical)."""
    model = plain_ptq(_lm("llama"))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    assert [n for n, m in model.named_modules() if isinstance(m, QuantLinear)] == \
        [f"model.layers.{i}.{n}" for i in range(2) for n in names]
    family = qwt.family_of(model)
    assert [s.path for s in family.plan(model).steps] == ["model.layers.0", "model.layers.1"]
    assert family.residual_branches(model, "model.layers.1") == ["self_attn.o_proj", "mlp.down_proj"]
    with torch.no_grad():
        assert torch.isfinite(model(_ids(2)).logits).all()


def test_gemma3_channelwise_corrects_after_the_post_norms_and_folds_its_gain_into_them():
    """Gemma 3 normalises each branch's output before the residual add, so the per-channel correction sits on the
    post-norms' outputs (what the branch adds). Its gain folds into the norm's weight, which Gemma applies as
    ``1 + w``: w' = (1 + w)·g − 1; a norm has no bias, so the shift stays (a ChannelAffine of unit gain). Weights
    only (A16): the folded model computes (1 + w')·n(x) for (1 + w)·g·n(x), equal up to the rounding of w' (a few
    float32 ulps of each product), and no activation quantiser can turn that into a code step."""
    model = qwt.quantize(_lm("gemma3_text"), _ids(4), qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=16))
    qwt.apply_qwt(model, _ids(16, seed=2), qwt.QwTConfig(fp16_eval=False, compensation="channelwise"), batch_size=4,
                  progress=False)
    affine = model.get_submodule("model.layers.0.post_attention_layernorm")
    assert isinstance(affine, qwt.compensation.ChannelAffine) and type(affine.layer).__name__ == "Gemma3RMSNorm"
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), QuantLinear)
    gains = {n: m.gain.clone() for n, m in model.named_modules() if isinstance(m, qwt.compensation.ChannelAffine)}
    weights = {n: model.get_submodule(n).layer.weight.clone() for n in gains}
    assert len(gains) == 4 and not all(torch.equal(g, torch.ones_like(g)) for g in gains.values())
    folded = copy.deepcopy(model)
    assert qwt.compensation.fold_channelwise(folded) == 4
    for name, gain in gains.items():
        affine = folded.get_submodule(name)
        assert torch.equal(affine.gain, torch.ones_like(gain))  # only the shift is left
        assert torch.allclose(affine.layer.weight, (1 + weights[name]) * gain - 1, rtol=0, atol=1e-6)
    with torch.no_grad():
        before, after = model(_ids(4, seed=3)).logits, folded(_ids(4, seed=3)).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_folding_refuses_a_norm_with_a_bias_before_changing_anything():
    """A LayerNorm has a bias the gain would have to scale too: refused whole, nothing folded."""
    norm = torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(qwt.compensation.ChannelAffine(norm, torch.full((8,), 2.0), torch.zeros(8)))
    with pytest.raises(ValueError, match="0: the correction follows a LayerNorm, which is neither a Linear"):
        qwt.compensation.fold_channelwise(model)
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(model[0].gain, torch.full((8,), 2.0))


def test_loading_sets_no_environment_variable_and_uses_no_network(local_model):
    """Importing the task and loading a checkpoint folder leave os.environ and transformers' log settings as they
    were (no process-wide HF_HUB_OFFLINE), with every socket connection refused. The third-party packages are
    imported before the snapshot: importing torchvision sets TORCHINDUCTOR_CACHE_DIR (torch._dynamo's cache)."""
    script = f"""
import os, socket
import torchvision, transformers
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(name, None)
before = dict(os.environ)
def refuse(*args, **kwargs):
    raise OSError("network use")
socket.socket.connect = refuse
from transformers.utils import logging
import qwt.tasks.llm
from qwt.models.lm_loading import load_causal_lm
settings = (logging.get_verbosity(), logging.is_progress_bar_enabled())
model, tokenizer, label = load_causal_lm({str(local_model / "model")!r})
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert (logging.get_verbosity(), logging.is_progress_bar_enabled()) == settings
print(label, len(tokenizer))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["model", "97"]


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gemma3_text", "opt", "gpt2"])
def test_task_runs_each_family_from_a_checkpoint_folder(model_type, local_model, tmp_path, capsys):
    folder = tmp_path / model_type
    torch.manual_seed(0)
    build_from_config(config=tiny_config(model_type, vocab_size=97)).save_pretrained(folder)
    _char_tokenizer().save_pretrained(folder)
    code, err = _main(["--model", folder, "--calib-text", local_model / "calib.txt", "--eval-text",
                       local_model / "eval.txt", "--window", 32, "--calib-windows", 8, "--eval-windows", 4,
                       "--bits", "W4A8", "--guard-fraction", 0, "--continuation-tokens", 1, "--out", tmp_path / "out",
                       "--no-progress"], capsys)
    assert code == 0, err
    record = _record(tmp_path / "out", model_type)  # named for the checkpoint folder
    rows = record["rows"]
    assert _rows(record) == [("FP", None, "fp", None), ("W4A8", "rtn", "ptq", None),
                             ("W4A8", "rtn", "qwt", "dense"), ("W4A8", "rtn", "qwt", "channelwise")]
    assert all(math.isfinite(r["perplexity"]) for r in rows) and rows[2]["blocks_kept"] == 2


# -- the runner's labels, records and refusals -------------------------------------------------------------------

def _small_run(local_model, out, *extra):
    return ["--model", local_model / "model", "--calib-text", local_model / "calib.txt", "--eval-text",
            local_model / "eval.txt", "--window", 32, "--calib-windows", 8, "--batch-size", 2, "--bits", "W4A8",
            "--continuation-tokens", 2, "--no-progress", "--out", out, *extra]


def test_gptq_takes_every_calibration_window_and_its_layer_errors_reach_the_details(local_model, tmp_path, capsys,
                                                                                      monkeypatch):
    """GPTQ's Hessians come from all --calib-windows (in --batch-size batches), the static ranges from the
    --ptq-windows; the run's data says how many windows GPTQ used, its details each layer's errors."""
    from qwt.ptq.baselines import gptq as gptq_module

    seen = []
    walk = gptq_module._block_walk
    monkeypatch.setattr(gptq_module, "_block_walk", lambda model, plan, data, options: (
        seen.append([tuple(b.shape) for b in data]), walk(model, plan, data, options))[1])
    out = tmp_path / "out"
    code, err = _main(_small_run(local_model, out, "--forms", "dense", "--method", "gptq", "--ptq-windows", 2),
                      capsys)
    assert code == 0, err
    assert seen == [[(2, 32)] * 4]  # 8 windows of 32 tokens, 2 per batch
    record = _record(out, "model-gptq")
    assert record["data"]["gptq_windows"] == 8 and record["data"]["ptq_windows"] == 2
    layers = json.loads((out / "details" / "model-gptq.json").read_text())["gptq_layers"]["W4A8 gptq (activations=rtn)"]
    assert len(layers) == 14 and all(set(v) == {"gptq_loss", "output_error", "output_error_rtn", "output_norm"}
                                     for v in layers.values())


def test_a_second_run_on_one_out_is_refused_and_leaves_the_first_results_as_they_were(local_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _main(_small_run(local_model, out, "--forms", "dense"), capsys)
    assert code == 0, err
    before = _files(out)
    assert {"model.json", "model.md", "model.png", "details/model.json"} <= set(before)
    code, err = _main(_small_run(local_model, out, "--bits", "W3A16"), capsys)
    assert code == 2 and len(err) == 1 and "already holds a complete record of model" in err[0], err
    assert _files(out) == before
    capsys.readouterr()  # the same run again: its complete record is there, nothing is run or written
    assert llm.main("test", [str(a) for a in _small_run(local_model, out, "--forms", "dense")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _files(out) == before


@pytest.mark.parametrize("settings,message", [
    ({"method": "awq"}, "argument --method: invalid choice: 'awq'"),  # used to run GPTQ and label it AWQ
    ({"window": 0}, "argument --window: must be at least 1"),
    ({"batch_size": 0}, "argument --batch-size: must be at least 1"),
    ({"forms": ["dense", "sparse"]}, "argument --forms: unknown QwT form 'sparse'; choose dense, channelwise or rank<R>"),
    ({"ridge": "nan"}, "argument --ridge: must be finite"),
    ({"no_progress": "yes"}, "no_progress is true or false"),
    ({"window": [32, 64]}, "window takes one value"),
    ({"windows": 4}, "unknown setting(s) windows"),
    (["W4A8"], "expected a JSON object"),
])
def test_config_file_values_are_checked_as_the_flags_are(settings, message, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings))
    code, err = _main(["--config", config, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and f"--config {config}" in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_valid_config_file_runs_and_the_command_line_wins(local_model, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"method": "rtn", "bits": ["W3A16"], "forms": ["dense"], "window": 16,
                                  "no_progress": True, "eval_windows": None}))
    code, err = _main(["--config", config] + _small_run(local_model, tmp_path / "out"), capsys)
    assert code == 0, err
    record = _record(tmp_path / "out")
    assert _rows(record) == [("FP", None, "fp", None), ("W4A8", "rtn", "ptq", None), ("W4A8", "rtn", "qwt", "dense")]
    details = json.loads((tmp_path / "out" / "details" / "model.json").read_text())
    assert record["data"]["window"] == 32 and [f["compensation"] for f in details["qwt"]] == ["dense"]


def test_seconds_are_split_into_ptq_and_qwt_and_the_first_form_gets_the_continuation(local_model, tmp_path, capsys,
                                                                                     monkeypatch):
    """A baseline made to take 3 s: a QwT row's QwT seconds must not contain them (they used to be added)."""
    import time

    def slow_quantize(*args, **kwargs):
        time.sleep(3)
        return qwt.quantize(*args, **kwargs)

    monkeypatch.setattr(llm_task, "quantize", slow_quantize)
    code, err = _main(_small_run(local_model, tmp_path / "out", "--forms", "channelwise"), capsys)
    assert code == 0, err
    record = _record(tmp_path / "out")
    fp, base, comp = record["rows"]
    assert "ptq_seconds" not in fp and "qwt_seconds" not in base and base["ptq_seconds"] >= 3
    assert comp["ptq_seconds"] == base["ptq_seconds"] and 0 < comp["qwt_seconds"] < 3
    assert "| PTQ s | QwT s |" in (tmp_path / "out" / "model.md").read_text()
    assert set(record["data"]["continuations"]) >= {"W4A8 rtn", "W4A8 rtn + QwT channel-wise"}


def test_peak_memory_is_each_rows_own():
    """A big allocation in one row must not show in the next row's peak (it used to be a running maximum), even
    with freed memory retained as the command line retains it."""
    from qwt.allocator import retain_freed_memory

    retain_freed_memory()
    memory = PeakMemory("cpu")
    if not memory.per_row:
        pytest.skip("this platform's peak resident memory cannot be reset (such tables say 'running max')")
    memory.reset()
    big = torch.ones(64 * 2**20)  # 256 MiB, written
    first = memory.read_mb()
    del big
    memory.reset()
    small = torch.ones(2**20)
    second = memory.read_mb()
    assert first - second > 200 and small.sum() > 0


def test_a_running_maximum_is_labelled_as_one(local_model, tmp_path, capsys):
    code, err = _main(_small_run(local_model, tmp_path / "out", "--forms", "dense"), capsys)
    assert code == 0, err
    record = _record(tmp_path / "out")
    assert record["peak_memory"] in ("per row", "running max")
    peak = "| peak MB (running max) |" if record["peak_memory"] == "running max" else "| peak MB |"
    assert peak in (tmp_path / "out" / "model.md").read_text()
    columns = llm.LanguageModel.columns
    record["peak_memory"] = "running max"
    assert "| peak MB (running max) |" in results_table(record["rows"], columns, "t", record)
    record["peak_memory"] = "per row"
    assert "| peak MB |" in results_table(record["rows"], columns, "t", record)


def _tiny_mixtral(vocab_size: int = 128):
    torch.manual_seed(0)
    return build_from_config(config={**tiny_config("mixtral", vocab_size=vocab_size), "num_local_experts": 4,
                                     "num_experts_per_tok": 2})


def test_mixture_of_experts_layers_are_refused_not_left_unquantised():
    """transformers keeps Mixtral's experts as 3-D tensors and its router outside nn.Linear: RTN would leave them
    FP while every row says W4A8."""
    fp = _tiny_mixtral()
    for call in (lambda: qwt.quantize(fp, _ids(2), W4A8), lambda: qwt.family_of(fp).plan(fp)):
        with pytest.raises(qwt.errors.InputError, match=r"^MixtralForCausalLM: model\.layers\.0\.mlp\.gate\.weight "
                                                        r"\(4, 64\) \(and 5 more\) is a weight of a decoder layer"):
            call()
    assert not any(isinstance(m, QuantLinear) for m in fp.modules())
    for model_type in ("llama", "qwen2", "mistral"):
        model = qwt.quantize(_lm(model_type), _ids(2), W4A8)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_a_mixture_of_experts_checkpoint_is_refused_before_the_fp_evaluation(local_model, tmp_path, capsys):
    folder = tmp_path / "mixtral"
    _tiny_mixtral(vocab_size=97).save_pretrained(folder)
    _char_tokenizer().save_pretrained(folder)
    argv = _small_run(local_model, tmp_path / "out")
    argv[1] = folder
    code, err = _main(argv, capsys)
    assert code == 2 and len(err) == 1 and "experts" in err[0] and "MixtralForCausalLM" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_the_fp_evaluation(local_model, tmp_path,
                                                                                         capsys, monkeypatch):
    """Before, ``--bits W4g48A8`` on a model of width 64 evaluated the FP model (minutes on a real one) and only
    then failed, when RTN first calibrated a weight, with a message naming neither layer nor flag."""
    monkeypatch.setattr(llm_task, "score_windows", lambda *a, **k: pytest.fail("the FP model was evaluated first"))
    code, err = _main(_small_run(local_model, tmp_path / "out", "--method-option", "group_size=48"), capsys)
    assert code == 2 and len(err) == 1, err
    assert "group size 48 does not divide the 64 input columns of model.layers.0.self_attn.q_proj" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(qwt.errors.InputError, match="group size 48 does not divide"):
        qwt.quantize(_lm("gpt2"), _ids(2), llm.parse_bits("W4A8", "rtn", {"group_size": 48}))


def test_the_smoke_model_follows_the_seed():
    tokenizer = _char_tokenizer()
    a, b, c = (llm_task._tiny_random_lm(tokenizer, seed).state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
