"""The model cache (rule cache_model, peftbench.modelcache): a model loaded from its cache folder is
the model loaded from its spec — the same state dict, the same logits, the same randomly
initialised head from the same seed (the cache keeps the checkpoint's keys) — and the stages that
read the cache record the spec as before: tokenised data, SVD factors and a trained run come out
identical. A missing or incomplete cache fails naming the file and the fix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import recipe_args
from safetensors import safe_open
from safetensors.torch import load_file

from peftbench import modelcache
from peftbench.cli import main
from peftbench.io import read_metadata
from peftbench.models import ModelError, load_causal_lm, load_classifier, load_tokenizer
from peftbench.vocab import MODEL_CACHE_MANIFEST, PROVENANCE, RUN_FILES, get_task


def cache(spec, out: Path) -> Path:
    main(["cache-model", "--model", str(spec), "--out", str(out)])
    return out


def keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def headless_bert(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny BERT without its pooler (as all-MiniLM: no pooler, no classifier weights)."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("headless-bert")
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(tiny_model_dir), add_pooling_layer=False).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_classifier_from_cache_is_the_classifier_from_the_spec(headless_bert, tmp_path, task):
    folder = cache(headless_bert, tmp_path / "models" / "tiny")
    # copied as they are: no pooler or classifier key appears in the cache
    assert keys(folder) == keys(headless_bert) and not any("pooler" in k or "classifier" in k for k in keys(folder))
    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for source in ("spec", "cache"):
        torch.manual_seed(7)  # the run's seed, before the model is built (train.run)
        model = load_classifier(str(headless_bert), get_task(task), folder if source == "cache" else None).eval()
        with torch.no_grad():
            out[source] = (model, model(input_ids=ids).logits, torch.get_rng_state())
    same_state(out["spec"][0], out["cache"][0])  # the head and pooler drawn from the same seed
    assert torch.equal(out["spec"][1], out["cache"][1])
    assert torch.equal(out["spec"][2], out["cache"][2])  # the same random draws: the adapter init follows


def test_causal_lm_from_cache_is_the_causal_lm_from_the_spec(tiny_llama_dir, tmp_path):
    folder = cache(tiny_llama_dir, tmp_path / "llama")
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    out = {}
    for source in ("spec", "cache"):
        torch.manual_seed(3)
        model = load_causal_lm(str(tiny_llama_dir), folder if source == "cache" else None).eval()
        with torch.no_grad():
            out[source] = (model, model(input_ids=ids).logits, torch.get_rng_state())
    same_state(out["spec"][0], out["cache"][0])
    assert torch.equal(out["spec"][1], out["cache"][1]) and torch.equal(out["spec"][2], out["cache"][2])
    tok_spec, tok_cache = load_tokenizer(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_dir), folder)
    text = "The movie was great, wasn't it?"
    assert tok_spec(text)["input_ids"] == tok_cache(text)["input_ids"] and tok_spec.pad_token == tok_cache.pad_token


def test_cli_writes_safetensors_and_a_manifest(tiny_model_dir, tmp_path):
    folder = cache(tiny_model_dir, tmp_path / "c")
    man = json.loads((folder / MODEL_CACHE_MANIFEST).read_text())
    assert man["spec"] == str(tiny_model_dir) and man["how"] == "copied" and man["gguf_file"] is None
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(man["files"])
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
    mask = os.umask(0)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in folder.iterdir()} == {0o666 & ~mask}  # not transformers' 0600
    assert (folder / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    from peftbench.outputs import model_provenance

    assert {k: man[k] for k in ("model_revision", "model_sha256")} == model_provenance(str(tiny_model_dir))
    # written again: the folder is replaced, nothing partial is left beside it
    cache(tiny_model_dir, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["c"]


def test_pytorch_bin_weights_become_safetensors_with_the_same_keys(tiny_model_dir, tmp_path):
    src = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, src)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    folder = cache(src, tmp_path / "c")
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    assert keys(folder) == set(state)
    torch.manual_seed(0)
    a = load_classifier(str(src), get_task("sst2"))
    torch.manual_seed(0)
    same_state(a, load_classifier(str(src), get_task("sst2"), folder))


def test_hub_id_is_copied_from_its_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: calls.append(repo) or str(tiny_model_dir))
    folder = cache("someone/tiny-bert", tmp_path / "c")
    assert calls == ["someone/tiny-bert"] and keys(folder) == keys(tiny_model_dir)
    assert json.loads((folder / MODEL_CACHE_MANIFEST).read_text())["spec"] == "someone/tiny-bert"


def test_saving_through_transformers_reloads_the_same_decoder(tiny_llama_dir, tmp_path):
    """The GGUF branch (load_causal_lm, save_pretrained, reload check), on a safetensors decoder."""
    dst = tmp_path / "saved"
    dst.mkdir()
    modelcache._save_through_transformers(str(tiny_llama_dir), dst)
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    same_state(load_causal_lm(str(tiny_llama_dir)), load_causal_lm(str(dst)))


def test_missing_or_incomplete_cache_names_the_file_and_the_fix(tiny_model_dir, tmp_path):
    spec = str(tiny_model_dir)
    with pytest.raises(ModelError, match=r"does not exist.*cache-model --model"):
        load_classifier(spec, get_task("sst2"), tmp_path / "nowhere")
    folder = cache(tiny_model_dir, tmp_path / "c")
    with pytest.raises(ModelError, match="was made from model spec"):
        load_tokenizer("package:other", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    with pytest.raises(ModelError, match=r"model\.safetensors has 100 bytes"):
        load_classifier(spec, get_task("sst2"), folder)
    weights.unlink()
    with pytest.raises(ModelError, match=r"model\.safetensors is missing.*cache-model"):
        load_classifier(spec, get_task("sst2"), folder)
    weights.write_bytes(data)
    (folder / MODEL_CACHE_MANIFEST).unlink()
    with pytest.raises(ModelError, match=f"incomplete: no {MODEL_CACHE_MANIFEST}.*cache-model --model {spec}"):
        load_tokenizer(spec, folder)


def test_a_directory_without_weights_is_refused(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights from_pretrained reads"):
        modelcache.write_cache(str(src), tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.partial").exists()


def test_stages_from_the_cache_write_what_they_write_from_the_spec(tiny_model_dir, glue_dir, tmp_path):
    """tokenize, svd and train: the same files and metadata (the spec recorded, not the cache)."""
    spec, folder = str(tiny_model_dir), cache(tiny_model_dir, tmp_path / "models" / "tiny")
    out = {}
    for source in ("spec", "cache"):
        d = tmp_path / source
        extra = ["--model-cache", str(folder)] if source == "cache" else []
        for split in ("train", "validation"):
            main(["tokenize", "--model", spec, *extra, "--task", "sst2", "--split", split, "--max-length", "32",
                  "--glue-dir", str(glue_dir), "--out", str(d / f"{split}.parquet")])
        main(["svd", "--model-name", "tiny", "--model", spec, *extra, "--top-k", "8",
              "--factors", str(d / "factors.safetensors"), "--spectrum", str(d / "spectrum.parquet")])
        main(["train", "--model-name", "tiny", "--model", spec, *extra, "--task", "sst2", "--method", "lora",
              "--budget", "r4", "--seed", "1", "--train", str(d / "train.parquet"),
              "--dev", f"validation={d / 'validation.parquet'}",
              *recipe_args({"lr": 2e-2, "epochs": 1, "batch_size": 16, "max_train_samples": 32,
                            "max_eval_samples": 32}), "--out", str(d / "run")])
        out[source] = d
    s, c = out["spec"], out["cache"]
    for split in ("train", "validation"):
        assert read_metadata(c / f"{split}.parquet") == read_metadata(s / f"{split}.parquet")
        assert read_metadata(c / f"{split}.parquet")["model"] == spec
        assert (c / f"{split}.parquet").read_bytes() == (s / f"{split}.parquet").read_bytes()
    for f in ("factors.safetensors", f"run/{RUN_FILES['adapter']}"):  # (safetensors' metadata order varies)
        ts, tc = load_file(str(s / f)), load_file(str(c / f))
        assert ts.keys() == tc.keys() and all(torch.equal(ts[k], tc[k]) for k in ts), f
    ms, mc = (pd.read_parquet(d / "run" / RUN_FILES["metrics"]).iloc[0] for d in (s, c))
    assert mc["dev_main"] == ms["dev_main"]
    assert {k: mc[k] for k in PROVENANCE if k.startswith("model_")} == \
        {k: ms[k] for k in PROVENANCE if k.startswith("model_")}
    ps, pc = (pd.read_parquet(d / "run" / RUN_FILES["predictions"]) for d in (s, c))
    pd.testing.assert_frame_equal(ps, pc)
