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
