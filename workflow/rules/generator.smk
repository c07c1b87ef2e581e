# Parameter generator (seed 004; peftbench.generator): the adapter snapshots of the collected LoRA
# runs (runtime key snapshots) are tokenised with the prompt sets and splits (tokenize_params), one
# generator is trained per split (train_generator: in_task, and loto_<task> per held-out task) and
# evaluated (evaluate_generator: generated adapters and baselines scored on the dev set by the
# training loop's evaluate), then summarised and drawn
# (generator_report). Everything under results/generator/{name}/.
# The rules exist for every config; their input functions fail with a clear message when a
# generator target is requested and generator.enabled is false.


rule tokenize_params:
    """Tokenise every collected run's snapshots; prompt sets; splits."""
    input:
        # metrics.parquet marks a finished run; its snapshots/ lie beside it
        generator_run_files("metrics") if config["generator"]["enabled"] else [],
    output:
        **{
            k: os.path.join(generator_dir(), "data", f)
            for k, f in GENERATOR_DATA_FILES.items()
        },
    log:
        os.path.join(GENERATOR_LOGS, "tokenize_params.log"),
    benchmark:
        os.path.join(GENERATOR_BENCHMARKS, "tokenize_params.tsv")
    conda:
        "../../envs/train.yaml"
    params:
        settings=lambda w: generator_settings().to_json(),
        glue=glue_dir_arg(),
        runs=lambda w: " ".join(generator_runs()),
        out=lambda w: os.path.join(generator_dir(), "data"),
    shell:
        "python -m peftbench tokenize-params --settings {params.settings:q} {params.glue}"
        " --out {params.out} {params.runs} > {log} 2>&1"


rule train_generator:
    """Train the prompt-to-LoRA generator on one split."""
    input:
        **generator_data_files(),
    output:
        **{
            k: os.path.join(generator_dir(), "{split}", GENERATOR_SPLIT_FILES[k])
            for k in ("weights", "curve", "manifest")
        },
    log:
        os.path.join(GENERATOR_LOGS, "train_{split}.log"),
    benchmark:
        os.path.join(GENERATOR_BENCHMARKS, "train_{split}.tsv")
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        settings=lambda w: generator_settings().to_json(),
        data=lambda w: os.path.join(generator_dir(), "data"),
        out=lambda w: os.path.join(generator_dir(), w.split),
        # outside the outputs: Snakemake deletes a failed job's outputs, never this directory
        checkpoints=lambda w: os.path.join(
            "results/checkpoints/generator", config["generator"]["name"], w.split
        ),
    shell:
        "python -m peftbench train-generator --settings {params.settings:q} --data {params.data}"
        " --split {wildcards.split} --checkpoint-dir {params.checkpoints} --out {params.out} > {log} 2>&1"


rule evaluate_generator:
    """Generate adapters for the split's held-out prompts; score them and the baselines on the dev set."""
    input:
        unpack(generator_eval_inputs),
    output:
        **{
            k: os.path.join(generator_dir(), "{split}", GENERATOR_SPLIT_FILES[k])
            for k in ("evaluation", "reconstruction", "errors_by_matrix")
        },
        adapters=directory(
            os.path.join(generator_dir(), "{split}", GENERATOR_SPLIT_FILES["adapters"])
        ),
    log:
        os.path.join(GENERATOR_LOGS, "evaluate_{split}.log"),
    benchmark:
        os.path.join(GENERATOR_BENCHMARKS, "evaluate_{split}.tsv")
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        args=generator_eval_args,
        cache=lambda w: model_cache_dir(generator_settings().model),
        runtime=lambda w: Untracked(
            pbconfig.runtime_for(
                config, generator_settings().tasks[0], generator_settings().method
            ).to_json()
        ),
        data=lambda w: os.path.join(generator_dir(), "data"),
        out=lambda w: os.path.join(generator_dir(), w.split),
    shell:
        "python -m peftbench evaluate-generator --data {params.data} --generator {input.generator}"
        " {params.args} --model-cache {params.cache} --runtime {params.runtime:q} --out {params.out} > {log} 2>&1"


rule generator_report:
    """Summary table, Markdown (in-task and zero-shot apart) and every figure of GENERATOR_PLOTS."""
    input:
        **(
            {
                k: generator_split_files(k)
                for k in ("evaluation", "reconstruction", "curve", "errors_by_matrix")
            }
            if config["generator"]["enabled"]
            else {}
        ),
    output:
        table=os.path.join(generator_dir(), GENERATOR_SUMMARY["table"]),
        markdown=os.path.join(generator_dir(), GENERATOR_SUMMARY["markdown"]),
        figures=[
            os.path.join(generator_dir(), f"{k}.{ext}")
            for k in GENERATOR_PLOTS
            for ext in ("pdf", "png")
        ],
    log:
        os.path.join(GENERATOR_LOGS, "report.log"),
    benchmark:
        os.path.join(GENERATOR_BENCHMARKS, "report.tsv")
    conda:
        "../../envs/analysis.yaml"
    params:
        name=config["generator"]["name"],
        out=lambda w, output: os.path.dirname(output.table),
    shell:
        "python -m peftbench generator-report --name {params.name} --evaluation {input.evaluation}"
        " --reconstruction {input.reconstruction} --curve {input.curve} --errors-by-matrix {input.errors_by_matrix}"
        " --out-dir {params.out} > {log} 2>&1"
