"""Seed 004, the prompt-to-LoRA parameter generator: snapshots, the invertible parameter
tokenisation, the HyperConv shapes, planning errors, and one tiny end-to-end run through real
Snakemake (tiny random backbone, 2 tasks, 1 seed, 3 snapshots per run) whose evaluation table and
manifests are checked."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import recipe_args
from conftest import snakemake_run as smk

ROOT = Path(__file__).resolve().parents[1]


# -- the parameter tokenisation -------------------------------------------------------------------

def _peft_state(tiny_model_dir, method="lora", budget="r2", seed=0):
    """The adapter state dict (state_to_save) of a freshly built tiny model, with random B."""
    from peftbench.runkey import RunKey
    from peftbench.recipe import Recipe
    from peftbench.train import build_model
    from peftbench.vocab import get_task

    torch.manual_seed(seed)
    model, method_obj, _ = build_model(str(tiny_model_dir), get_task("cola"), RunKey.of("tiny", "cola", method, budget, seed),
                                       Recipe.from_dict({}), 4, 8, torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # B is zero at init; a real round trip needs non-zero values everywhere
    return method_obj.state_to_save(model)


def test_tokenisation_round_trip_is_exact(tiny_model_dir):
    from peftbench.generator.params import ParamLayout

    state = _peft_state(tiny_model_dir)
    layout = ParamLayout.from_state(state, token_width=64, max_tokens=128)
    # 2 layers x 6 matrices x (A rows + B columns) = 2 x 6 x 2r tokens, A before B, in layer order
    r = state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"].shape[0]
    assert layout.used_tokens == 2 * 6 * 2 * r
    assert [e.kind for e in layout.entries[:4]] == ["query", "query", "key", "key"]
    assert [e.factor for e in layout.entries[:2]] == ["A", "B"]
    tokens = layout.tokenize(state)
    assert tokens.shape == (128, 64)
    mask = layout.mask()
    assert (tokens[~mask] == 0).all() and mask.sum() == sum(t.numel() for k, t in state.items() if "lora_" in k)
    back = layout.detokenize(tokens)
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert back.keys() == lora.keys()
    for k in lora:
        assert torch.equal(back[k], lora[k]), k                # bit for bit
    # the JSON form of the layout gives the same mapping
    assert ParamLayout.from_json(layout.to_json()) == layout
    # normalisation is inverted on the real entries
    from peftbench.generator.params import denormalise, normalise, token_stats

    mean, std = token_stats(tokens[None], mask)
    assert torch.allclose(denormalise(normalise(tokens, mask, mean, std), mask, mean, std), tokens, atol=1e-6)


def test_tokenisation_errors_name_the_file(tiny_model_dir):
    from peftbench.generator.params import ParamLayout, ParamTokenError

    state = _peft_state(tiny_model_dir)
    with pytest.raises(ParamTokenError, match=r"ckpt\.safetensors.*token width generator\.token_width = 16"):
        ParamLayout.from_state(state, token_width=16, max_tokens=512, source="ckpt.safetensors")
    with pytest.raises(ParamTokenError, match="generator.max_tokens = 8"):
        ParamLayout.from_state(state, token_width=64, max_tokens=8, source="ckpt.safetensors")
    layout = ParamLayout.from_state(state, token_width=64, max_tokens=512)
    other = _peft_state(tiny_model_dir, budget="r4")            # another rank
    with pytest.raises(ParamTokenError, match=r"other\.safetensors: .*mismatched rank"):
        layout.tokenize(other, "other.safetensors")
    attn = _peft_state(tiny_model_dir, method="lora_attn")      # other matrices
    with pytest.raises(ParamTokenError, match="attn.safetensors: its LoRA tensors differ"):
        layout.tokenize(attn, "attn.safetensors")
    with pytest.raises(ParamTokenError, match="no LoRA tensors"):
        ParamLayout.from_state({"classifier.weight": torch.zeros(2, 2)}, 64, 64, "head.safetensors")


# -- the generator --------------------------------------------------------------------------------

def test_generator_shapes_per_block():
    from peftbench.generator.model import HyperConvBlock, PromptToLoRA

    blocks = [((2, 8, 24), 3), ((3, 16, 40), 5), ((4, 32, 48), 3)]
    g = PromptToLoRA(embed_dim=20, samples=4, latent=(2, 4, 16), blocks=blocks, token_width=50)
    x = torch.randn(5, 4, 20)                                    # (B, S, E)
    shapes = []
    h = g.expander(g.input_proj(x).transpose(1, 2)).transpose(1, 2).reshape(5, 2, 4, 16)
    for b in g.blocks:
        h = b(h)
        shapes.append(tuple(h.shape))
    assert shapes == [(5, 2, 8, 24), (5, 3, 16, 40), (5, 4, 32, 48)]
    assert g(x).shape == (5, 4 * 32, 50) and g.tokens == 128
    # equal in/out shapes: residual block
    same = HyperConvBlock((2, 8, 24), (2, 8, 24), 3)
    with torch.no_grad():
        for conv in (same.conv_w, same.conv_h, same.conv_l):
            conv.weight.zero_()
            conv.bias.zero_()
    z = torch.randn(3, 2, 8, 24)
    assert torch.allclose(same(z), z)                            # GELU(0) = 0: only the residual path


# -- snapshots ------------------------------------------------------------------------------------

def test_snapshot_steps():
    from peftbench.train import snapshot_steps

    assert snapshot_steps(8, 3) == (3, 5, 8)
    assert snapshot_steps(8, 0) == ()
    assert snapshot_steps(2, 5) == (1, 2)


def test_snapshots_do_not_change_the_run(tmp_path, tiny_model_dir, tiny_data):
    from peftbench.cli import main

    rec = {"epochs": 1, "batch_size": 8, "max_train_samples": 24, "max_eval_samples": 16, "log_every": 1,
           "checkpoint_every": 0, "lr": 1e-3}
    base = ["train", "--model-name", "tiny", "--task", "cola", "--method", "lora", "--budget", "r2", "--seed", "1",
            "--model", str(tiny_model_dir), "--train", str(tiny_data["cola"]["train"]),
            "--dev", f"validation={tiny_data['cola']['validation']}"]
    main(base + recipe_args(rec) + ["--out", str(tmp_path / "a")])
    stale = tmp_path / "b" / "snapshots" / "step000099.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier run")
    main(base + recipe_args({**rec, "snapshots": 2}) + ["--out", str(tmp_path / "b")])
    a = pd.read_parquet(tmp_path / "a" / "metrics.parquet").iloc[0]
    b = pd.read_parquet(tmp_path / "b" / "metrics.parquet").iloc[0]
    assert a["dev_main"] == b["dev_main"] and a["steps"] == b["steps"] == 3
    assert not (tmp_path / "a" / "snapshots").exists()
    files = sorted(p.name for p in (tmp_path / "b" / "snapshots").iterdir())
    assert files == ["step000002.safetensors", "step000003.safetensors"]   # the stale file is gone
    from safetensors.torch import load_file

    final, adapter = load_file(tmp_path / "b" / "snapshots" / files[-1]), load_file(tmp_path / "b" / "adapter.safetensors")
    assert final.keys() == adapter.keys() and all(torch.equal(final[k], adapter[k]) for k in final)


# -- the DAG --------------------------------------------------------------------------------------

def _config(work: Path, tiny_model_dir, glue_dir, **generator) -> None:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["models"] = {"tiny": str(tiny_model_dir)}
    cfg["data"].update(glue_dir=str(glue_dir), max_train_samples=32, max_eval_samples=32)
    cfg["grid"].update(models=["tiny"], tasks=["cola", "sst2"], methods=["lora_attn"], budgets=["r2"], seeds=[1])
    cfg["training"]["defaults"].update(epochs=2, batch_size=8, max_length=32, log_every=2, snapshots=3)
    cfg["training"].pop("tasks", None)  # the quickstart's per-task epochs: every task trains the defaults here
    cfg["generator"] = {"enabled": True, "name": "tiny", "encoder": str(tiny_model_dir), "token_width": 32,
                        "max_tokens": 64, "samples_per_prompt": 2, "train_prompts": 4, "validation_prompts": 2,
                        "latent": [2, 4, 16], "blocks": [{"shape": [2, 8, 16], "kernel": 3},
                                                         {"shape": [2, 32, 32], "kernel": 3}],
                        "epochs": 3, "batch_size": 4, "lr": 1e-3, **generator}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("generator, message", [
    ({"method": "adalora"}, "generator.method: 'adalora' cannot be tokenised"),
    ({"tasks": ["cola"]}, "generator.zero_shot: leave-one-task-out needs at least two tasks"),
    ({"max_tokens": 48}, "generator.blocks: the last block's length × height"),
    ({"blocks": [{"shape": [2, 32, 32], "kernel": 2}]}, "generator.blocks.0.kernel: 2 is even"),
])
def test_bad_generator_config_fails_at_planning(generator, message, tiny_model_dir, glue_dir):
    import peftbench.config as pbconfig

    cfg_path = ROOT / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["grid"].update(tasks=["cola", "sst2"], methods=["lora_attn"])
    cfg["training"]["defaults"]["snapshots"] = 3
    cfg["generator"] = {"enabled": True, **generator}
    with pytest.raises(pbconfig.ConfigError, match=message.replace("(", r"\(").replace("×", "×")):
        pbconfig.validate(cfg)
    cfg["generator"] = {"enabled": True}
    cfg["training"]["defaults"]["snapshots"] = 0
    with pytest.raises(pbconfig.ConfigError, match="save no adapter snapshots.*training.methods.lora_attn.snapshots"):
        pbconfig.validate(cfg)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_model_dir, glue_dir):
    """The tiny generator grid run through real Snakemake up to its summary and figures."""
    work = tmp_path_factory.mktemp("generator")
    _config(work, tiny_model_dir, glue_dir)
    # one thread per job: two small jobs at a time on the test machine's two cores (gpu=2: the
    # default profile's gpu=1 would run the train and generator jobs one at a time)
    smk(work, "results/generator/tiny/summary.md", "--resources", "gpu=2", "--set-threads", "train=1",
        "train_generator=1", "evaluate_generator=1")
    return work / "results" / "generator" / "tiny"


@pytest.mark.snakemake
def test_generator_grid_produces_the_evaluation_table(generated):
    ev = pd.read_parquet(generated / "in_task" / "evaluation.parquet")
    # per (task, seed): trained, checkpoint_mean, head_only once, generated once per held-out prompt
    counts = ev.groupby(["task", "seed", "variant"]).size().unstack()
    assert counts.shape == (2, 4) and (counts["generated"] == 2).all()
    assert (counts[["trained", "checkpoint_mean", "head_only"]] == 1).all().all()
    assert ev.dev_main.notna().all() and set(ev.metric) == {"matthews_correlation", "accuracy"}
    # the trained variant is scored by the training loop's evaluate: it reproduces the run's dev metric
    for (task, seed), g in ev[ev.variant == "trained"].groupby(["task", "seed"]):
        run = pd.read_parquet(generated.parents[1] / "runs" / "tiny" / task / "lora_attn" / "br2" / f"s{seed}" /
                              "metrics.parquet").iloc[0]
        assert g.dev_main.iloc[0] == pytest.approx(run["dev_main"], abs=1e-6)
    summary = pd.read_parquet(generated / "summary.parquet")
    assert sorted(summary.split) == ["in_task", "in_task", "loto_cola", "loto_sst2"]
    assert summary[summary.zero_shot].task.tolist() == ["cola", "sst2"]
    assert summary[["rel_error", "dev_generated", "dev_trained", "dev_checkpoint_mean", "dev_head_only"]].notna().all().all()
    md = (generated / "summary.md").read_text()
    assert "## In-task" in md and "## Zero-shot (leave-one-task-out)" in md
    # generated adapters are peft adapters
    adapter = generated / "in_task" / "adapters" / "cola" / "s1" / "p0"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file()
    for k in ("generator_curves", "generator_metric", "generator_errors"):
        assert (generated / f"{k}.png").stat().st_size > 0
    curve = pd.read_parquet(generated / "in_task" / "curve.parquet")
    assert sorted(curve.role.unique()) == ["train", "validation"] and curve.epoch.max() == 3
    assert set(curve.columns) >= {"mse", "l1", "total", "mae", "rmse", "rel_error", "lr"}


@pytest.mark.snakemake
def test_zero_shot_split_never_sees_the_held_out_task(generated):
    ckpts = pd.read_parquet(generated / "data" / "checkpoints.parquet")
    assert len(ckpts) == 2 * 1 * 3                               # tasks x seeds x snapshots
    for held in ("cola", "sst2"):
        man = pd.read_parquet(generated / f"loto_{held}" / "manifest.parquet")
        train, val = man[man.role == "train"], man[man.role == "validation"]
        assert len(train) == 3 and held not in set(train.task)
        assert not any(f"/{held}/" in p for p in train.path)
        assert set(val.task) == {held} and len(val) == 1         # the held-out task's final checkpoint
    man = pd.read_parquet(generated / "in_task" / "manifest.parquet")
    assert len(man[man.role == "train"]) == 6 and set(man.task) == {"cola", "sst2"}


def test_too_small_prompt_set_names_the_file():
    from peftbench.generator.dataset import prompt_sets
    from peftbench.generator.settings import GeneratorSettings

    s = GeneratorSettings.from_json(json.dumps({
        "name": "t", "model": "m", "method": "lora", "budget": "r2", "tasks": ["cola"], "seeds": [1], "encoder": "e",
        "encoder_max_length": 32, "token_width": 8, "max_tokens": 8, "max_checkpoints": 5, "samples_per_prompt": 4,
        "train_prompts": 2, "validation_prompts": 1, "prompt_seed": 0, "zero_shot": False, "latent": [1, 1, 1],
        "blocks": [[[1, 8, 1], 1]], "epochs": 1, "batch_size": 1, "lr": 1e-3, "weight_decay": 0.0, "mse_weight": 1.0,
        "l1_weight": 0.1, "seed": 0, "checkpoint_every": 0}))
    texts = [f"sentence {i}" for i in range(12)]
    p = prompt_sets({"cola": (texts, "glue/cola/train.parquet")}, s)
    assert len(p) == 3 and (p.role == "validation").sum() == 1
    rows = [r for rs in p.rows for r in rs]
    assert len(rows) == len(set(rows)) == 12                     # non-overlapping prompts
    with pytest.raises(ValueError, match=r"glue/cola/train\.parquet: 11 training sentences of cola, the prompt set needs 12"):
        prompt_sets({"cola": (texts[:11], "glue/cola/train.parquet")}, s)


@pytest.mark.snakemake
def test_generator_training_resumes_after_a_kill(generated, tmp_path, monkeypatch):
    """A job killed after its first checkpoint continues from it and ends with the curve and weights
    of an uninterrupted job."""
    import dataclasses

    from peftbench.generator import fit
    from peftbench.generator.fit import train_generator
    from safetensors.torch import load_file

    s = fit.load_generator(generated / "in_task" / "generator.safetensors")[1]
    s = dataclasses.replace(s, epochs=3, checkpoint_every=1)
    data = generated / "data"
    train_generator(data_dir=data, split="in_task", settings=s, out_dir=tmp_path / "a", device="cpu")
    real, calls = fit.validate, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(fit, "validate", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_generator(data_dir=data, split="in_task", settings=s, out_dir=tmp_path / "b",
                        checkpoint_dir=tmp_path / "ckpt", device="cpu")
    assert (tmp_path / "ckpt" / "generator.pt").is_file() and not (tmp_path / "b").exists()
    monkeypatch.setattr(fit, "validate", real)
    train_generator(data_dir=data, split="in_task", settings=s, out_dir=tmp_path / "b",
                    checkpoint_dir=tmp_path / "ckpt", device="cpu")
    a, b = (pd.read_parquet(tmp_path / d / "curve.parquet") for d in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)
    wa, wb = (load_file(tmp_path / d / "generator.safetensors") for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / "ckpt" / "generator.pt").exists()
