"""The torch-free vocabulary and method table, the method registry's loud failures, RunKey."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench import methods as registry
from peftbench.methods import FULL_BUDGET, METHOD_TABLE, METHODS, MethodInfo, get_method, register
from peftbench.budget import Budget, BudgetError
from peftbench.runkey import KEY_COLUMNS, RunKey

ROOT = Path(__file__).resolve().parents[1]


def test_planning_modules_do_not_import_torch():
    """The Snakefile's table lookups (vocabulary, method table, run keys, recipes, config
    coercion) work without PyTorch; only the option check imports method modules."""
    code = ("import sys; sys.path.insert(0, 'workflow'); "
            "import peftbench.vocab, peftbench.methods, peftbench.runkey, peftbench.recipe, peftbench.config, "
            "peftbench.analysis.cli; "
            "from peftbench.methods import method_info; method_info('dynacsg').uses_svd; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_table_line_resolves_to_its_class():
    for info in METHOD_TABLE:
        cls = get_method(info.name)
        assert cls.name == info.name and cls.__module__.endswith("." + info.module)
        assert cls.info() is info
        cls.options_cls()  # defaults are valid options


def test_table_line_with_a_misspelled_module_fails_loudly(monkeypatch):
    bad = MethodInfo("loraa", "loraa_typo", "typo")
    monkeypatch.setitem(METHODS, "loraa", bad)
    with pytest.raises(ImportError, match=r"method 'loraa': METHOD_TABLE names module peftbench\.methods\.loraa_typo"):
        get_method("loraa")


def test_module_that_registers_nothing_fails_loudly(monkeypatch):
    monkeypatch.setitem(METHODS, "ghost", MethodInfo("ghost", "options", "ghost"))  # a module without a Method
    with pytest.raises(ValueError, match=r"registers no Method with name = 'ghost'"):
        get_method("ghost")


def test_registering_a_class_without_a_table_line_fails():
    from peftbench.methods.base import Method

    class Orphan(Method):
        name = "orphan"

    with pytest.raises(ValueError, match=r"no line in METHOD_TABLE"):
        register(Orphan)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered methods: full, lora"):
        get_method("qlora")


def test_runkey_round_trips_path_cli_and_columns():
    key = RunKey.of("minilm", "stsb", "lora", "0.5", "2")
    assert key.run_dir() == "results/runs/minilm/stsb/lora/b0.5/s2"
    assert key.checkpoint_dir() == "results/checkpoints/minilm/stsb/lora/b0.5/s2"
    assert RunKey.parse(key.run_dir()) == key
    assert RunKey.parse(Path("/abs") / key.run_dir()) == key
    parser = argparse.ArgumentParser()
    RunKey.add_arguments(parser)
    assert RunKey.from_args(parser.parse_args(key.cli_args())) == key
    assert list(key.columns()) == list(KEY_COLUMNS)
    # the budget column is the path token (a string: "0.5", "r8", "100"), the same in every table
    assert key.columns() == {"model": "minilm", "task": "stsb", "method": "lora", "budget": "0.5", "seed": 2}


def test_rank_budget_round_trips_path_cli_and_columns():
    key = RunKey.of("minilm", "stsb", "lora", "r8", 2)
    assert key.budget == Budget.rank(8) and key.budget.kind == "rank" and key.budget.value == 8
    assert key.run_dir() == "results/runs/minilm/stsb/lora/br8/s2"
    assert RunKey.parse(key.run_dir()) == key
    parser = argparse.ArgumentParser()
    RunKey.add_arguments(parser)
    assert key.cli_args()[key.cli_args().index("--budget") + 1] == "r8"
    assert RunKey.from_args(parser.parse_args(key.cli_args())) == key
    assert key.columns()["budget"] == "r8"


def test_budget_spellings_are_one_key():
    assert RunKey.of("m", "t", "lora", 0.5, 1) == RunKey.of("m", "t", "lora", "0.50", 1)
    assert RunKey.of("m", "t", "lora", 1.0, 1).budget.token == "1"
    # sortable: percentages by value (not as strings: 2 < 10), then rank budgets, then full
    keys = [RunKey.of("m", "t", "lora", b, 1) for b in ("r8", "10", "r2", 2, 0.5)] + [RunKey.of("m", "t", "full", 0, 1)]
    assert [b.token for b in sorted(k.budget for k in keys)] == ["0.5", "2", "10", "r2", "r8", "100"]


def test_bad_budget_on_the_command_line_names_what_is_allowed(capsys):
    parser = argparse.ArgumentParser()
    RunKey.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-name", "m", "--task", "t", "--method", "lora", "--budget", "r0", "--seed", "1"])
    assert "r<N>" in capsys.readouterr().err
    with pytest.raises(BudgetError, match="full budget of budget-free methods"):
        RunKey.of("m", "t", "lora", 100, 1)


def test_budget_free_method_is_stored_under_the_full_budget():
    key = RunKey.of("minilm", "cola", "full", 0.6, 1)
    assert key.budget == Budget.full() and key.budget.value == FULL_BUDGET
    assert key.run_dir().endswith("/full/b100/s1") and key.columns()["budget"] == "100"
    assert RunKey.of("minilm", "cola", "full", "r8", 1) == key
    assert RunKey.of("minilm", "cola", "lora", 1.0, 1).run_dir().endswith("/lora/b1/s1")


@pytest.mark.parametrize("path", ["results/runs/a/b/c/d/e", "x/y", "r/m/t/meth/bX/s1", "r/m/t/meth/br0/s1"])
def test_parse_rejects_what_is_not_a_run_directory(path):
    with pytest.raises(ValueError, match="is not a run directory"):
        RunKey.parse(path)


def test_adding_a_method_is_one_file_and_one_table_line(tmp_path, monkeypatch):
    """A new method file + a table line: get_method, the config check, the adapter lr layer and
    the run keys all see it with no other edit."""
    import yaml

    from peftbench import config as pbconfig

    src = '''
from dataclasses import dataclass
from . import register
from .lora import LoRA, LoRAOptions
from .options import option

@dataclass
class Options(LoRAOptions):
    scale: float = option(1.0, "a made-up option, > 0")

    def __post_init__(self):
        super().__post_init__()
        self.require("scale", self.scale > 0, "must be > 0")

@register
class MyLoRA(LoRA):
    name = "mylora"
    options_cls = Options
'''
    pkg_dir = Path(registry.__file__).parent
    f = pkg_dir / "mylora.py"
    f.write_text(src)
    try:
        monkeypatch.setitem(METHODS, "mylora", MethodInfo("mylora", "mylora", "my LoRA"))
        assert get_method("mylora").name == "mylora"
        cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
        cfg["grid"]["methods"] = ["lora", "mylora"]
        c = pbconfig.validate(cfg)
        assert c["method_options"]["mylora"]["scale"] == 1.0
        assert pbconfig.recipe_for(c, "cola", "mylora").lr == c["training"]["adapters"]["lr"]
        cfg["method_options"]["mylora"] = {"scale": -1}
        with pytest.raises(pbconfig.ConfigError, match=r"method_options\.mylora\.scale: -1\.0 — must be > 0"):
            pbconfig.validate(cfg)
    finally:
        f.unlink()
        registry._CLASSES.pop("mylora", None)
        sys.modules.pop("peftbench.methods.mylora", None)
