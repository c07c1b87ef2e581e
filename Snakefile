# peftbench: which PEFT method gives the best accuracy for a trainable-parameter budget?
# DAG: cache_model -> svd + tokenize -> [tune, with tuning.enabled] -> train (model, task, method, budget, seed) -> aggregate -> significance -> plots
# See README.md and ../shared/DESIGN.md. Rules live in workflow/rules/*.smk; each calls one
# subcommand of the peftbench package (workflow/peftbench), which also runs without Snakemake.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


# common.smk coerces --config strings, validates the config against
# workflow/schemas/config.schema.yaml (defaults filled in) and checks every method's options.
include: "workflow/rules/common.smk"


report: "workflow/report/workflow.rst"


include: "workflow/rules/models.smk"
include: "workflow/rules/svd.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/ood.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/generator.smk"


rule all:
    default_target: True
    input:
        # every figure of peftbench.vocab.PLOTS; the per-task kind once per task of the grid
        # (the tuning figures only with tuning.enabled: they read its trials table; the OOD
        # figures only when ood.sets names sets for a task of the grid)
        expand(
            "results/comparison/{name}.pdf",
            name=[
                n
                for n in figure_names(config["grid"]["tasks"])
                if (TUNING["enabled"] or n not in TUNING_PLOTS)
                and (ood_files() or n not in OOD_PLOTS)
            ],
        ),
        "results/comparison/summary.md",
        "results/comparison/explorer.html",
        # OOD accuracies, when ood.sets names sets for a task of the grid
        [table_path("ood")] if ood_files() else [],
        # the parameter generator's summary and figures, with generator.enabled
        generator_targets(),
