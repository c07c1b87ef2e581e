"""SVD precompute: top-k singular triplets of every target weight matrix of a model.

For each target ``W ∈ R^{d_out×d_in}`` (attention q/k/v/output, both feed-forward matrices) the
stage stores ``U_k ∈ R^{d_out×k}``, ``S_k ∈ R^k``, ``Vh_k ∈ R^{k×d_in}`` with ``W ≈ U_k diag(S_k) Vh_k``
(Eckart–Young), in fp32, under the keys ``{module}.U``, ``{module}.S``, ``{module}.Vh`` of
``factors.safetensors``. ``spectrum.parquet`` holds every stored singular value with its
cumulative energy ``Σ_{j≤i} σ_j² / Σ_j σ_j²`` (over *all* singular values of the matrix, so the
last stored value shows how much of the matrix the top-k capture).

Uses the full ``torch.linalg.svd`` (exact; a 768×3072 matrix takes milliseconds on a GPU) on the
GPU when one is available, else on the CPU.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch

from .io import save_tensors, write_table
from .modelcache import check_cache
from .models import find_targets, load_causal_lm, load_classifier, model_source
from .vocab import get_task

log = logging.getLogger(__name__)


def compute_svd(model_spec: str, model_name: str, top_k: int, factors_out: str | Path, spectrum_out: str | Path,
                device: str | None = None, model_cache: str | Path | None = None) -> dict:
    """Compute and write the truncated SVD of every target matrix of ``model_spec``.

    Args:
        model_spec: model spec (see :func:`peftbench.models.resolve_model`).
        model_name: short name recorded in the ``model`` column.
        top_k: singular triplets kept per matrix (capped at ``min(d_out, d_in)``).
        factors_out: ``factors.safetensors`` path.
        spectrum_out: ``spectrum.parquet`` path.
        device: ``cuda``/``cpu``; default: CUDA when available.
        model_cache: the spec's model cache folder (:mod:`peftbench.modelcache`) to load from;
            ``None``: the spec.

    Returns:
        ``{"matrices": n, "seconds": t, "device": str}``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the head is irrelevant here; a GGUF decoder (SmolLM2) has no config.json for a classifier
    gguf = check_cache(model_cache, model_spec)["gguf_file"] if model_cache else model_source(model_spec)[1]
    model = (load_causal_lm(model_spec, model_cache) if gguf is not None
             else load_classifier(model_spec, get_task("sst2"), model_cache))
    modules = dict(model.named_modules())
    tensors, rows = {}, []
    t0 = time.perf_counter()
    targets = find_targets(model)
    for i, t in enumerate(targets):
        w = modules[t.name].weight.detach().to(dev, torch.float32)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = min(top_k, s.numel())
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        tensors[f"{t.name}.U"] = u[:, :k].contiguous().cpu()
        tensors[f"{t.name}.S"] = s[:k].contiguous().cpu()
        tensors[f"{t.name}.Vh"] = vh[:k].contiguous().cpu()
        for j in range(k):
            rows.append((model_name, t.name, t.layer, t.kind, j, float(s[j]), float(energy[j])))
        if (i + 1) % 12 == 0 or i + 1 == len(targets):
            log.info("SVD %d/%d matrices", i + 1, len(targets))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    save_tensors(tensors, factors_out, metadata={"model": model_name, "top_k": str(top_k)})
    df = pd.DataFrame(rows, columns=["model", "module", "layer", "kind", "index", "sigma", "energy"])
    write_table(df, spectrum_out, metadata={"model": model_name, "top_k": top_k, "seconds": seconds})
    log.info("SVD of %d matrices on %s in %.2f s", len(targets), dev, seconds)
    return {"matrices": len(targets), "seconds": seconds, "device": str(dev)}


def load_factors(path: str | Path, module: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U (d_out×k), S (k,), Vh (k×d_in))`` of ``module`` from a ``factors.safetensors`` file.

    Raises:
        FileNotFoundError: the file is missing (run the ``svd`` rule first).
        KeyError: the module is not in the file (the file was made for another model).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SVD factors {path} not found; run `snakemake {path}` (rule svd) first")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        if f"{module}.U" not in keys:
            raise KeyError(f"{path} has no factors for {module}; it was computed for another model")
        return f.get_tensor(f"{module}.U"), f.get_tensor(f"{module}.S"), f.get_tensor(f"{module}.Vh")
