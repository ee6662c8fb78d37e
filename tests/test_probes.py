"""Inputs found by probing the public calls with odd values: each used to end in a raw traceback from deep inside
torch, and is now refused in one line naming the argument."""
import pytest
import torch

import qwt
from qwt.errors import InputError


@pytest.mark.parametrize("batch_size", [0, -4, True, 2.0])
def test_apply_qwt_refuses_a_batch_size_that_is_not_a_positive_integer(batch_size):
    """Before: ``split_size can only be 0 ...`` (RuntimeError) or ``split() received an invalid combination``
    (TypeError); ``True`` would have been a batch of one image."""
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = qwt.quantize(qwt.create_model("vit_fmnist", pretrained=False), images, qwt.PTQConfig())
    with pytest.raises(InputError, match=f"batch_size must be an integer ≥ 1, got {batch_size!r}"):
        qwt.apply_qwt(model, images, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("first,second", [("dense", "dense"), ("channelwise", "channelwise"),
                                          ("dense", "channelwise"), ("channelwise", "dense")])
def test_apply_qwt_refuses_a_model_it_already_compensated(first, second):
    """Before, a second dense fit ran (its FP target went through the first compensation, which does not switch
    off with quantisation) and added the same correction again, silently; channel-wise twice doubled the
    corrections likewise; channel-wise after dense ended in an AttributeError from inside the branch lookup; dense
    after channel-wise fitted towards an FP output distorted by the corrections."""
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = qwt.quantize(qwt.create_model("vit_fmnist", pretrained=False), images, qwt.PTQConfig())
    qwt.apply_qwt(model, images, qwt.QwTConfig(compensation=first), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="already holds QwT compensation"):
        qwt.apply_qwt(model, images, qwt.QwTConfig(compensation=second), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gptq_refuses_an_infinite_damping():
    from qwt.ptq.baselines import GPTQ

    with pytest.raises(ValueError, match="damp must be a finite number"):
        GPTQ(damp=float("inf"))


def test_a_full_disk_ends_a_command_in_one_line_not_a_traceback(capsys):
    import errno

    from qwt.cli import run_cli

    def fails() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/results/summary.json")

    assert run_cli(fails) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: [Errno 28] No space left on device")
