"""The ``precision`` recipe key: resolution per device, the recorded column, and bf16 autocast
really in effect (behaviour only; its speed is benchmarked by ``peftbench bench``)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from peftbench import precision as prec
from test_stages import _train


def test_auto_follows_the_cpu_flags(monkeypatch, tmp_path):
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert prec.cpu_bf16_flags(str(with_amx)) == ("amx_bf16",)
    assert prec.cpu_bf16_flags(str(plain)) == ()
    assert prec.cpu_bf16_flags(str(tmp_path / "missing")) == ()
    cpu = torch.device("cpu")
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert prec.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ())
    assert prec.resolve_precision("auto", cpu) == "fp32"
    assert prec.resolve_precision("fp32", cpu) == "fp32"
    assert prec.resolve_precision("bf16", cpu) == "bf16"  # allowed, with a warning


def test_unknown_precision_names_the_key():
    with pytest.raises(ValueError, match="training.defaults.precision"):
        prec.resolve_precision("fp16", torch.device("cpu"))


def test_config_rejects_an_unknown_precision():
    from peftbench.config import validate

    cfg = {"models": {"tiny": "x"}, "grid": {"models": ["tiny"], "tasks": ["sst2"], "methods": ["lora"],
                                             "budgets": [0.5], "seeds": [0]},
           "training": {"defaults": {"precision": "half"}}}
    with pytest.raises(Exception, match="precision"):
        validate(cfg)


def test_bf16_run_records_its_precision_and_autocasts(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    seen = []
    real = torch.autocast

    class Spy(real):
        def __init__(self, device_type, dtype=None, enabled=True, **kw):
            seen.append((device_type, dtype, enabled))
            super().__init__(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", Spy)
    fp32 = pd.read_parquet(_train(tiny_model_dir, tiny_data, tmp_path / "a", "lora", precision="fp32")
                           / "metrics.parquet").iloc[0]
    assert fp32["precision"] == "fp32" and not any(e for _, _, e in seen)
    seen.clear()
    bf16 = pd.read_parquet(_train(tiny_model_dir, tiny_data, tmp_path / "b", "lora", precision="bf16")
                           / "metrics.parquet").iloc[0]
    assert bf16["precision"] == "bf16" and bf16["status"] == "ok"
    assert ("cpu", torch.bfloat16, True) in seen  # training and evaluation under bf16 autocast
    # the same run at another precision is a different result (the key is tracked)
    assert bf16["dev_main"] != fp32["dev_main"]
