"""The fast CPU dropout kernel (peftbench.dropout): its distribution, gradient, module swap and
the runtime key (speed is benchmarked, see peftbench.bench)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from peftbench.dropout import (FastDropout, drop_probability, keep_mask, resolve_dropout_kernel,
                               use_dropout_kernel)
from test_stages import _train


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_keep_mask_drops_with_probability_p_at_every_bit_position(p):
    """Each of the four 16-bit integers cut from a 64-bit word is a uniform draw: the drop rate
    at every position (element index mod 4) is p within 5 standard errors."""
    torch.manual_seed(0)
    keep = keep_mask((400, 1000), p)
    assert keep.dtype == torch.bool and keep.shape == (400, 1000)
    q = drop_probability(p)
    n = keep.numel() // 4
    se = math.sqrt(q * (1 - q) / n)
    for pos in range(4):
        rate = 1.0 - keep.flatten()[pos::4].float().mean().item()
        assert abs(rate - q) < 5 * se, (pos, rate, q)
    # neighbouring elements are not correlated (the same word's four draws are independent)
    a, b = keep.flatten()[0::2].float(), keep.flatten()[1::2].float()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(a.numel())


def test_keep_mask_is_reproducible_and_odd_sizes_work():
    torch.manual_seed(3)
    a = keep_mask((7, 3, 5), 0.2)
    torch.manual_seed(3)
    b = keep_mask((7, 3, 5), 0.2)
    assert a.shape == (7, 3, 5) and torch.equal(a, b)
    assert keep_mask((9,), 0.0).all() and not keep_mask((9,), 1.0).any()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        keep_mask((3,), 1.5)


def test_drop_probability_rounds_to_a_multiple_of_2_pow_minus_16():
    assert drop_probability(0.1) == 6554 / 65536
    assert abs(drop_probability(0.1) - 0.1) <= 2 ** -17
    assert drop_probability(0.0) == 0.0 and drop_probability(1.0) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_forward_and_backward_are_mask_times_scale(dtype):
    torch.manual_seed(5)
    x = torch.randn(6, 33, dtype=dtype, requires_grad=True)
    drop = FastDropout(0.25)
    y = drop(x)
    assert y.dtype == dtype and y.shape == x.shape
    keep = y != 0
    scale = 1.0 / (1.0 - drop_probability(0.25))
    torch.testing.assert_close(y[keep], (x[keep].float() * scale).to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g.float() * keep * scale).to(dtype))
    # unbiased: the mean of many draws of the same input is the input
    torch.manual_seed(6)
    ones = torch.ones(2000, 500)
    assert FastDropout(0.1)(ones).mean().item() == pytest.approx(1.0, abs=3e-3)


def test_fast_dropout_is_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(4, 5)
    drop = FastDropout(0.5).eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_use_dropout_kernel_switches_every_dropout_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ModuleDict({"default": nn.Dropout(0.3)}),
                          nn.Dropout(0.0), nn.Identity())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = list(model.modules())
    assert use_dropout_kernel(model, "fast") == 2
    assert type(model[1]) is FastDropout and type(model[2]["default"]) is FastDropout
    assert model[2]["default"].p == 0.3 and type(model[3]) is nn.Dropout  # p = 0 stays as it is
    assert list(model.modules()) == mods  # the same module objects
    assert use_dropout_kernel(model, "torch") == 2 and type(model[1]) is nn.Dropout
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        use_dropout_kernel(model, "auto")


def test_resolve_dropout_kernel():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dropout_kernel("auto", cpu, compiled=False) == "fast"
    assert resolve_dropout_kernel("auto", cpu, compiled=True) == "torch"
    assert resolve_dropout_kernel("auto", cuda, compiled=False) == "torch"
    assert resolve_dropout_kernel("fast", cuda, compiled=False) == "fast"
    assert resolve_dropout_kernel("fast", cpu, compiled=True) == "torch"  # does not trace: falls back
    with pytest.raises(ValueError, match="dropout_kernel must be one of"):
        resolve_dropout_kernel("philox", cpu, compiled=False)


def test_training_records_the_dropout_kernel_and_the_kernels_differ_only_in_the_draw(tiny_model_dir, tiny_data,
                                                                                        tmp_path):
    """A CPU run resolves ``auto`` to ``fast`` (recorded in metrics.parquet); ``torch`` gives
    another random draw of the same training (another loss curve), and a rerun of ``fast``
    with the same seed reproduces it exactly."""
    common = dict(task="sst2", epochs=1, max_train_samples=64, batch_size=16)
    a = _train(tiny_model_dir, tiny_data, tmp_path / "a", "lora", **common)
    b = _train(tiny_model_dir, tiny_data, tmp_path / "b", "lora", dropout_kernel="fast", **common)
    c = _train(tiny_model_dir, tiny_data, tmp_path / "c", "lora", dropout_kernel="torch", **common)
    rows = [pd.read_parquet(d / "metrics.parquet").iloc[0] for d in (a, b, c)]
    assert [r["dropout_kernel"] for r in rows] == ["fast", "fast", "torch"]
    la, lb, lc = (pd.read_parquet(d / "curve.parquet").query("kind == 'train'")["loss"].to_numpy() for d in (a, b, c))
    assert (la == lb).all() and not (la == lc).all()


def test_an_unknown_dropout_kernel_is_refused_before_training(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _train(tiny_model_dir, tiny_data, tmp_path, "lora", task="sst2", dropout_kernel="philox")
    assert exc.value.code == 1
    cause = exc.value.__cause__
    assert isinstance(cause, ValueError) and "got 'philox'" in str(cause)
    assert not any(tmp_path.rglob("metrics.parquet"))
