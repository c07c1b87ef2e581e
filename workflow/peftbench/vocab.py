"""peftbench's vocabulary: the one table of every name that stages, rules and plots share.

Torch-free and import-cheap, so the Snakefile, the config check and the analysis stage read it
without loading a deep-learning stack. Everything else asks this module instead of keeping its
own list:

- :data:`TASKS`: the GLUE tasks of the encoder track and the generation tasks of the causal-LM
  track (what each reads, predicts and scores, its prompt, target and verbaliser, where its rows
  come from, its display label), in display order of every table and figure; :data:`TRACKS`;
- :data:`METRICS`: metric names (the field's standard ones, used unchanged as column names
  ``dev_<metric>``), their display label, short name and scale (stored as fractions, shown ×100);
- :data:`RUN_STATUSES`: what a row of ``runs.parquet`` can say about its run;
- :data:`RUN_FILES`: the files of one run directory (``predictions.parquet``: every dev example's
  label, prediction and logits; ``method_state.pt``: what a reload needs besides the adapter
  tensors; ``metrics.parquet`` last: the completion marker);
- :data:`TABLES`: the aggregated tables under ``results/tables``;
- :data:`OOD_SETS`, :data:`OOD_MAPS`: out-of-distribution sets and, per (training task, OOD
  set), how their label spaces are scored;
- :data:`PROVENANCE`: the columns of a run row that say what code, model, data, software and
  machine produced it;
- :data:`RUN_PHASES`: the columns of a run row that time the phases of its job (seconds);
- :data:`GRAD_GROUPS`, :data:`GRAD_TOTAL`: the parameter groups of the gradient-norm logs and their union;
- :data:`TARGET_KINDS`: the kinds of adapted weight matrix, in layer order;
- :data:`PLOTS`: every figure of the ``plot`` rule with the tables it reads;
- :data:`SNAPSHOT_DIR`, :data:`GENERATOR_PLOTS`: the parameter generator's (seed 004) run snapshots
  and figures.

The GLUE task table follows Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding" (arXiv:1804.07461), Table 1, and the Hugging Face
``nyu-mll/glue`` schema.
"""
from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One evaluation metric.

    Attributes:
        name: column name stem (``dev_<name>``), the field's standard name.
        label: axis / table label.
        short: short table header.
        scale: factor between the stored fraction and the displayed number (100: shown as %).
    """

    name: str
    label: str
    short: str
    scale: float = 100.0


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("matthews_correlation", "Matthews corr.", "MCC"),
    Metric("accuracy", "accuracy", "acc"),
    Metric("f1", "F1", "F1"),
    Metric("pearson", "Pearson r", "Pearson"),
    Metric("spearman", "Spearman ρ", "Spearman"),
    # generation metrics (causal-LM track): sacrebleu BLEU of n-gram order 1-4 (Papineni et al. 2002;
    # Post 2018, arXiv:1804.08771), rouge-score F-measures (Lin 2004), nltk METEOR (Banerjee & Lavie
    # 2005), exact match after lower-casing and whitespace normalisation (WikiSQL, Zhong et al. 2017,
    # arXiv:1709.00103)
    *(Metric(f"bleu{n}", f"BLEU-{n}", f"B{n}") for n in (1, 2, 3, 4)),
    Metric("rouge1", "ROUGE-1 F", "R1"),
    Metric("rouge2", "ROUGE-2 F", "R2"),
    Metric("rougeL", "ROUGE-L F", "RL"),
    Metric("rougeLsum", "ROUGE-Lsum F", "RLsum"),
    Metric("meteor", "METEOR", "MET"),
    Metric("exact_match", "exact match", "EM"),
)}

#: The metrics of a generation task scored on text (BLEU, ROUGE, METEOR): E2E NLG and SAMSum.
TEXT_METRICS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "rougeLsum",
                                 "meteor")

#: Short names of the eval-split suffixes of multi-split tasks (MNLI matched / mismatched).
_SPLIT_SHORT = {"matched": "m", "mismatched": "mm"}


def metric(name: str) -> Metric:
    """The :class:`Metric` of a metric column stem, split suffixes included.

    ``accuracy_matched`` (MNLI) is accuracy on the matched split: label "accuracy (matched)",
    short "acc-m". An unknown name comes back as itself (label = short = name), so a table with a
    metric this module does not know still renders.
    """
    if name in METRICS:
        return METRICS[name]
    base, _, suffix = name.rpartition("_")
    if base in METRICS and suffix in _SPLIT_SHORT:
        m = METRICS[base]
        return Metric(name, f"{m.label} ({suffix})", f"{m.short}-{_SPLIT_SHORT[suffix]}", m.scale)
    return Metric(name, name, name)


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------


#: Tracks of the benchmark: ``encoder`` (GLUE classification with an encoder and a classifier
#: head) and ``causal`` (seed 003: generation with a decoder-only language model, loss on the target
#: tokens only, left-padded greedy decoding at evaluation).
TRACKS: tuple[str, ...] = ("encoder", "causal")

#: Where a task's rows come from: ``glue`` (``nyu-mll/glue`` or the local mirror ``data.glue_dir``,
#: :func:`peftbench.data.load_split`) or ``hub`` (``datasets.load_dataset(hub_id, hub_config)``;
#: needs a network).
LOADERS: tuple[str, ...] = ("glue", "hub")


@dataclass(frozen=True)
class TaskSpec:
    """One task: a GLUE task of the encoder track, or a generation task of the causal-LM track.

    Attributes:
        name: GLUE config name (``cola``, ``sst2`` …), as in ``nyu-mll/glue``.
        label: display name (``CoLA``, ``SST-2``; MNLI: ``MNLI-m``, its main metric's split).
        text_columns: one column (single sentence) or two (sentence pair), tokenised as a pair.
        num_labels: classes; 1 means regression (STS-B, MSE loss, score 0–5).
        metrics: metric names computed on every evaluation split (keys of :data:`METRICS`).
        main_metric: the metric the GLUE average and the significance tests use.
        eval_splits: dev splits; the first is the one the main metric is read from. MNLI has two
            (matched, mismatched) and its metrics carry the suffix ``_matched``/``_mismatched``.
        track: :data:`TRACKS` (``encoder``: a classifier head; ``causal``: a decoder that
            generates the answer).
        loader: :data:`LOADERS`; ``glue`` tasks read ``source`` (a GLUE config name) from the GLUE
            mirror or hub, ``hub`` tasks ``hub_id`` / ``hub_config`` through ``datasets``.
        source: the GLUE config the rows come from (causal tasks built on GLUE: ``rte_gen`` reads
            ``rte``); default: ``name``.
        hub_id, hub_config: ``datasets.load_dataset`` arguments of a ``hub`` task.
        train_split: the split trained on.
        prompt: causal track: the prompt, a ``str.format`` template over the row's columns; the
            model continues it with the target.
        target: causal track: the column holding the target text, or ``None`` when the target is
            the verbaliser word of ``label``.
        verbaliser: causal classification: the answer word of each class id (the target text, and
            how a generated answer is scored: its first word, lower-cased, stripped of punctuation,
            must equal the class's word).
        group_by: causal text tasks with several references per input (E2E NLG): dev rows with the
            same value of this column are one example scored against all their targets.
        max_new_tokens: causal track: the cap on generated tokens at evaluation.
        max_target_tokens: causal track: target tokens kept when an example is longer than
            ``max_length`` (the prompt is cut from the left first).
    """

    name: str
    label: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)
    track: str = "encoder"
    loader: str = "glue"
    source: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    prompt: str | None = None
    target: str | None = None
    verbaliser: tuple[str, ...] | None = None
    group_by: str | None = None
    max_new_tokens: int = 8
    max_target_tokens: int = 64

    def __post_init__(self) -> None:
        if self.track not in TRACKS or self.loader not in LOADERS:
            raise ValueError(f"task {self.name}: track {self.track!r} / loader {self.loader!r}; allowed {TRACKS} / {LOADERS}")
        if self.is_causal and (self.prompt is None or (self.target is None) == (self.verbaliser is None)):
            raise ValueError(f"causal task {self.name}: needs a prompt and exactly one of target / verbaliser")

    @property
    def is_causal(self) -> bool:
        """A generation task of the causal-LM track."""
        return self.track == "causal"

    @property
    def glue_name(self) -> str:
        """The GLUE config the rows are read from (``source``, default the task's own name)."""
        return self.source or self.name

    @property
    def is_regression(self) -> bool:
        """True for STS-B: one output, MSE loss, Pearson/Spearman metrics (never a causal task)."""
        return self.num_labels == 1 and not self.is_causal

    def metric_names(self) -> list[str]:
        """All metric column names for this task (without the ``dev_`` prefix).

        For MNLI each metric is reported per eval split (``accuracy_matched``,
        ``accuracy_mismatched``); every other task has one eval split and plain names.
        """
        if len(self.eval_splits) == 1:
            return list(self.metrics)
        return [f"{m}_{split_suffix(s)}" for s in self.eval_splits for m in self.metrics]


def split_suffix(split: str) -> str:
    """``validation_matched`` -> ``matched``; ``validation`` -> ``validation``."""
    return split.split("_", 1)[1] if "_" in split else split


#: Every GLUE task, in the GLUE paper's order (the display order of tables and figures).
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("cola", "CoLA", ("sentence",), 2, ("matthews_correlation", "accuracy"), "matthews_correlation"),
    TaskSpec("sst2", "SST-2", ("sentence",), 2, ("accuracy",), "accuracy"),
    TaskSpec("mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy"),
    TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), "pearson"),
    TaskSpec("qqp", "QQP", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy"),
    TaskSpec("mnli", "MNLI-m", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy_matched",
             ("validation_matched", "validation_mismatched")),
    TaskSpec("qnli", "QNLI", ("question", "sentence"), 2, ("accuracy",), "accuracy"),
    TaskSpec("rte", "RTE", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy"),
    TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy"),
    # -- causal-LM track (seed 003): generation with a decoder, loss on the target tokens only.
    # Offline, from the GLUE mirror: RTE and SST-2 as instruction-style generation, scored by
    # verbaliser accuracy (Wang et al. 2019, arXiv:1804.07461).
    TaskSpec("rte_gen", "RTE (gen)", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy", track="causal",
             source="rte", prompt="Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the "
                                  "hypothesis? Answer yes or no.\nAnswer:", verbaliser=("yes", "no"), max_new_tokens=3),
    TaskSpec("sst2_gen", "SST-2 (gen)", ("sentence",), 2, ("accuracy",), "accuracy", track="causal",
             source="sst2", prompt="Review: {sentence}\nIs the sentiment of this review positive or negative?"
                                   "\nAnswer:", verbaliser=("negative", "positive"), max_new_tokens=3),
    # From the hub (need a network). MNLI as generation with a verbaliser (Williams et al. 2018,
    # arXiv:1704.05426; GLUE labels 0 entailment, 1 neutral, 2 contradiction).
    TaskSpec("mnli_gen", "MNLI-m (gen)", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy_matched",
             ("validation_matched", "validation_mismatched"), track="causal", source="mnli",
             prompt="Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? "
                    "Answer yes, maybe or no.\nAnswer:", verbaliser=("yes", "maybe", "no"), max_new_tokens=3),
    # E2E NLG (Novikova et al. 2017, arXiv:1706.09254): meaning representation -> restaurant
    # description; several human references per MR (the dev rows are grouped by MR).
    TaskSpec("e2e_nlg", "E2E NLG", ("meaning_representation",), 0, TEXT_METRICS, "bleu4", track="causal",
             loader="hub", hub_id="tuetschek/e2e_nlg", prompt="Meaning representation: {meaning_representation}"
                                                               "\nDescription:",
             target="human_reference", group_by="meaning_representation", max_new_tokens=64),
    # SAMSum (Gliwa et al. 2019, arXiv:1911.12237): dialogue summarisation.
    TaskSpec("samsum", "SAMSum", ("dialogue",), 0, TEXT_METRICS, "rougeL", track="causal", loader="hub",
             hub_id="knkarthick/samsum", prompt="Dialogue:\n{dialogue}\nSummary:", target="summary",
             max_new_tokens=96, max_target_tokens=128),
    # WikiSQL (Zhong et al. 2017, arXiv:1709.00103): question + table header -> SQL, exact match.
    TaskSpec("wikisql", "WikiSQL", ("question", "columns"), 0, ("exact_match",), "exact_match", track="causal",
             loader="hub", hub_id="Salesforce/wikisql", prompt="Table columns: {columns}\nQuestion: {question}\nSQL:",
             target="sql", max_new_tokens=64),
)}

#: Tasks of each track, in :data:`TASKS` order.
TRACK_TASKS: dict[str, tuple[str, ...]] = {tr: tuple(n for n, t in TASKS.items() if t.track == tr) for tr in TRACKS}

#: ``task`` value of the GLUE-average rows (significance and per-method statistics tables).
GLUE_AVG = "glue_avg"
GLUE_AVG_LABEL = "GLUE avg"


def get_task(name: str) -> TaskSpec:
    """Return the spec of GLUE task ``name``.

    Raises:
        KeyError: unknown task, with the list of known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def task_label(name: str) -> str:
    """Display label of a task (``GLUE avg`` for :data:`GLUE_AVG`; unknown names as they are)."""
    if name == GLUE_AVG:
        return GLUE_AVG_LABEL
    return TASKS[name].label if name in TASKS else name


def order_tasks(tasks) -> list[str]:
    """Tasks in :data:`TASKS` order, unknown ones A–Z after them, :data:`GLUE_AVG` last."""
    rank = {t: i for i, t in enumerate(TASKS)}
    return sorted(dict.fromkeys(tasks), key=lambda t: (t == GLUE_AVG, rank.get(t, len(rank)), t))


# ------------------------------------------------------------------------------------------------
# Out-of-distribution (OOD) evaluation sets
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OODSet:
    """One OOD evaluation set (the ``evaluate_ood`` stage, :mod:`peftbench.ood`).

    Attributes:
        name: the key of ``ood.sets.<task>`` lists (``anli_r1`` …).
        label: display name.
        hub_id, hub_config, split: where ``datasets.load_dataset`` finds it.
        local: file name under a local mirror (``data.anli_dir``) or ``None`` (hub only).
        text_columns: the premise/hypothesis columns, tokenised as a pair.
        classes: the set's own gold label names, by class id.
        licence: the data licence.
        breakdown: columns of the set that break the accuracy down (``ood.parquet`` rows per value
            of each, crossed with the gold class; HANS: its heuristic and subcase).
    """

    name: str
    label: str
    hub_id: str
    hub_config: str | None
    split: str
    local: str | None
    text_columns: tuple[str, ...]
    classes: tuple[str, ...]
    licence: str
    breakdown: tuple[str, ...] = ()


#: ``breakdown`` / ``subset`` / ``gold_class`` of an ``ood.parquet`` row over the whole set (the
#: headline row of each run and set; the other rows break it down).
OOD_ALL = "all"
#: HANS heuristics (McCoy et al. 2019, Table 1), in the paper's order.
HANS_HEURISTICS: tuple[str, ...] = ("lexical_overlap", "subsequence", "constituent")

_ANLI = ("entailment", "neutral", "contradiction")
#: Every OOD set. ANLI: Nie et al. 2020, "Adversarial NLI", arXiv:1910.14599 (rounds r1–r3, dev);
#: HANS: McCoy et al. 2019, "Right for the Wrong Reasons", arXiv:1902.01007 (hub only).
OOD_SETS: dict[str, OODSet] = {o.name: o for o in (
    # ANLI (Nie et al. 2020, arXiv:1910.14599): dev and test of each round; the offline copy
    # (data.anli_dir, e.g. ../shared/data/anli) holds the dev rounds only
    *(OODSet(f"anli_r{r}", f"ANLI R{r}", "facebook/anli", None, f"dev_r{r}", f"dev_r{r}.parquet",
             ("premise", "hypothesis"), _ANLI, "CC BY-NC 4.0") for r in (1, 2, 3)),
    *(OODSet(f"anli_r{r}_test", f"ANLI R{r} test", "facebook/anli", None, f"test_r{r}", f"test_r{r}.parquet",
             ("premise", "hypothesis"), _ANLI, "CC BY-NC 4.0") for r in (1, 2, 3)),
    OODSet("hans", "HANS", "jhu-cogsci/hans", None, "validation", None, ("premise", "hypothesis"),
           ("entailment", "non-entailment"), "see the jhu-cogsci/hans dataset card",
           breakdown=("heuristic", "subcase")),
)}


@dataclass(frozen=True)
class OODMap:
    """How a model trained on ``train_task`` is scored on ``ood_set``: both label spaces are
    mapped onto ``classes`` (the scored classes), gold labels by ``gold``, the model's argmax
    class by ``pred``; accuracy is computed there.

    Attributes:
        classes: names of the scored classes, by id.
        gold: OOD gold class id -> scored class id (every class of the set).
        pred: training-task class id -> scored class id (every class of the task).
        note: why the mapping is a fair proxy.
    """

    train_task: str
    ood_set: str
    classes: tuple[str, ...]
    gold: dict[int, int]
    pred: dict[int, int]
    note: str


#: The one table of label-space mappings, per (training task, OOD set). RTE: 0 entailment,
#: 1 not_entailment; ANLI: 0 entailment, 1 neutral, 2 contradiction (neutral and contradiction
#: are not-entailment: a documented proxy); MNLI: 0 entailment, 1 neutral, 2 contradiction;
#: HANS: 0 entailment, 1 non-entailment (McCoy et al. 2019 score MNLI models the same way).
OOD_MAPS: dict[tuple[str, str], OODMap] = {(m.train_task, m.ood_set): m for m in (
    *(OODMap("rte", f"anli_r{r}{part}", ("entailment", "not_entailment"), {0: 0, 1: 1, 2: 1}, {0: 0, 1: 1},
             "proxy: ANLI neutral and contradiction scored as RTE not_entailment")
      for r in (1, 2, 3) for part in ("", "_test")),
    *(OODMap("mnli", f"anli_r{r}{part}", ("entailment", "neutral", "contradiction"), {0: 0, 1: 1, 2: 2},
             {0: 0, 1: 1, 2: 2}, "the same three NLI classes (ANLI follows MNLI's label ids)")
      for r in (1, 2, 3) for part in ("", "_test")),
    OODMap("mnli", "hans", ("entailment", "non-entailment"), {0: 0, 1: 1}, {0: 0, 1: 1, 2: 1},
           "MNLI neutral and contradiction predictions scored as HANS non-entailment"),
)}


# ------------------------------------------------------------------------------------------------
# Runs and their files
# ------------------------------------------------------------------------------------------------

#: ``status`` of a row of ``runs.parquet``: finished; ended early with a NaN/inf loss (outputs
#: written, message in ``error``); or no ``metrics.parquet`` at aggregation time (killed, crashed).
RUN_STATUSES: dict[str, str] = {
    "ok": "finished; metrics from the last (dev_*) and best (best_dev_*) epoch",
    "failed": "stopped by a NaN/inf loss; outputs written, the message is in `error`",
    "missing": "no metrics.parquet when the runs were aggregated (the job crashed or was killed)",
}

#: The files of one run directory (key -> file name). ``metrics`` is written last: its presence
#: marks a finished run. ``method_state``: the method's :meth:`Method.checkpoint_state` at the end
#: of training (ranks a method re-allocated, masks, EMAs; ``torch.save`` of plain containers and
#: tensors), which a reload restores before it loads ``adapter`` (:func:`peftbench.checkpoint.load_trained`).
RUN_FILES: dict[str, str] = {
    "curve": "curve.parquet",
    "adapter": "adapter.safetensors",
    "method_state": "method_state.pt",
    "ranks": "ranks.parquet",
    "gradnorms": "gradnorms.parquet",
    "predictions": "predictions.parquet",
    "metrics": "metrics.parquet",
}

#: Aggregated tables under ``results/tables`` (key -> file name); the first five are concatenated
#: run files (``runs`` from ``metrics``; :data:`TABLE_SOURCES`), ``significance``,
#: ``method_stats``, ``example_significance`` and (when OOD sets are configured)
#: ``ood_significance`` are written by the significance stage, ``ood`` by
#: the ``aggregate_ood`` rule (from every run's :data:`OOD_FILE`), and ``trials`` (every trial of
#: every tuning study, :func:`peftbench.tuning.collect_trials`) by the ``tuning_table`` rule.
TABLES: dict[str, str] = {
    "runs": "runs.parquet",
    "curves": "curves.parquet",
    "ranks": "ranks.parquet",
    "gradnorms": "gradnorms.parquet",
    "predictions": "predictions.parquet",
    "significance": "significance.parquet",
    "method_stats": "method_stats.parquet",
    "trials": "trials.parquet",
    "example_significance": "example_significance.parquet",
    "ood": "ood.parquet",
    "ood_significance": "ood_significance.parquet",
}

#: Directory of a run's adapter snapshots (``runtime.snapshots``; ``step<NNNNNN>.safetensors``, not
#: Snakemake outputs: the ``tokenize_params`` rule lists them after the run's ``metrics.parquet``).
SNAPSHOT_DIR = "snapshots"

#: The ``evaluate_ood`` rule's file in a run directory (OOD accuracy per configured set).
OOD_FILE = "ood.parquet"

#: Packages whose version every run row records (``<package>_version``; ``python_version`` too).
VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "transformers", "peft", "peftbench")

#: Provenance columns of every run row (``metrics.parquet``, hence ``runs.parquet``): what
#: produced the numbers. Two runs compared in one table should agree on all of them; the summary
#: lists the ones that differ. Column -> meaning.
PROVENANCE: dict[str, str] = {
    "git_commit": "commit of the workflow checkout (`git rev-parse HEAD`; 'unknown' outside git)",
    "git_dirty": "the checkout had uncommitted or untracked changes (`git status --porcelain`; null: unknown)",
    "model_revision": "hub commit of the model snapshot, 'local' for a directory or package, else 'unknown'",
    "model_sha256": "sha256 of the model's weight file(s) (several: of their 'name sha256' lines)",
    "data_train_sha256": "sha256 of the tokenised train Parquet file the run read",
    "data_dev_sha256": "sha256 of the tokenised dev Parquet file(s) (several: 'split=sha256' joined by ',')",
    "python_version": "Python version",
    **{f"{p}_version": f"{p} version" for p in VERSIONED_PACKAGES},
    "cuda_version": "CUDA version PyTorch was built with ('none' for a CPU build)",
    "device": "GPU name, or 'cpu (<machine>)'",
    "host": "host name of the machine that trained the run",
}

#: Phase timings of every run row (``metrics.parquet``, hence ``runs.parquet``), wall-clock seconds
#: in the order a train job goes through them; column -> meaning. They do not overlap. A job's
#: wall-clock minus their sum is time outside them (optimizer set-up, interpreter exit, the
#: scheduler's own work): ``peftbench grid-overhead`` reports it.
RUN_PHASES: dict[str, str] = {
    "import_s": "process start to the training function (interpreter, torch/transformers imports); "
                "NaN when the run is not a process of its own (bench, tuning trials)",
    "load_data_s": "reading the tokenised train and dev splits into padded tensors",
    "load_model_s": ("loading the model: transformers importing the architecture's modules on first use (for a "
                     "small model most of this phase), reading the pretrained weights, wrapping them with the "
                     "method, moving them to the device"),
    "compile_s": "torch.compile compilation and warm-up steps (kept out of train_s)",
    "train_s": "optimizer steps (compilation excluded, evaluation excluded)",
    "eval_s": "dev-set evaluations, all epochs",
    "write_s": "provenance hashes and writing every run file before metrics.parquet",
}

#: Which run file each concatenated table collects.
TABLE_SOURCES: dict[str, str] = {"runs": "metrics", "curves": "curve", "ranks": "ranks", "gradnorms": "gradnorms",
                                 "predictions": "predictions"}

#: Parameter groups of the gradient-norm logs, in display order: embeddings (word, position, type
#: and relative-position embeddings, their LayerNorm; a decoder's ``embed_tokens``), attention and mlp
#: (everything inside a layer: adapters, and in full fine-tuning the layer's own weights and norms;
#: in a LLaMA-style decoder layer ``self_attn`` and ``input_layernorm`` are attention, ``mlp`` and
#: ``post_attention_layernorm`` mlp), head (classifier, pooler), lm_head (a decoder's output
#: projection when it is not tied to the embeddings), other (trainable parameters outside the
#: layers that are none of these, e.g. DeBERTa's encoder-level LayerNorm, a decoder's final norm or a
#: shared hypernetwork). The groups are disjoint.
GRAD_GROUPS: tuple[str, ...] = ("embeddings", "attention", "mlp", "head", "lm_head", "other")
#: Group name of the overall gradient norm of the logs: every trainable parameter (the union of
#: :data:`GRAD_GROUPS`, the norm gradient clipping sees), logged with layer −1.
GRAD_TOTAL = "total"

#: Kinds of adapted weight matrix, in the order they appear in a transformer layer. Encoders
#: (BERT/DeBERTa): query/key/value, attention output, intermediate and output dense; LLaMA-style
#: decoders: q/k/v/o_proj, then ``gate`` (gate_proj), ``intermediate`` (up_proj) and ``output``
#: (down_proj) of the gated MLP.
TARGET_KINDS: tuple[str, ...] = ("query", "key", "value", "attention_output", "gate", "intermediate", "output")
#: Target kinds of the attention block and of the feed-forward (MLP) block.
ATTENTION_KINDS: tuple[str, ...] = ("query", "key", "value", "attention_output")
MLP_KINDS: tuple[str, ...] = ("gate", "intermediate", "output")


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotKind:
    """One figure of the ``plot`` rule (``results/comparison/{kind}.pdf`` + ``.png``; its report
    caption is the ``{kind}`` section of ``workflow/report/plot.rst``).

    Attributes:
        name: the ``{kind}`` wildcard and ``peftbench plot KIND``.
        inputs: tables it reads (keys of :data:`TABLES`, or ``spectrum``: the svd stage's
            ``spectrum.parquet`` of every model).
        per_task: one figure per task (``{kind}`` is then a task name, e.g. ``cola.pdf``).
    """

    name: str
    inputs: tuple[str, ...]
    per_task: bool = False


PLOTS: dict[str, PlotKind] = {p.name: p for p in (
    PlotKind("glue", ("runs", "significance")),
    PlotKind("task", ("runs", "significance", "example_significance"), per_task=True),
    PlotKind("pareto", ("runs",)),
    PlotKind("cost", ("runs",)),
    PlotKind("curves", ("curves",)),
    PlotKind("ranks", ("ranks",)),
    PlotKind("spectrum", ("spectrum",)),
    PlotKind("gradnorms", ("gradnorms",)),
    PlotKind("gradheatmap", ("gradnorms",)),
    PlotKind("evp", ("trials",)),
    PlotKind("ood", ("runs", "ood", "significance", "ood_significance")),
)}
#: The local model cache of one ``models:`` key (rule ``cache_model``, :mod:`peftbench.modelcache`):
#: a ``save_pretrained`` folder (``config.json``, safetensors weights — a GGUF model's dequantised
#: fp32 —, tokenizer files) that every stage loads instead of resolving the model spec again.
MODEL_CACHE_DIR = "results/models/{model}"
#: The cache's manifest (written last: its presence marks a complete cache): the spec it was made
#: from, how, every file with its size, and the source's provenance (``model_revision``,
#: ``model_sha256``).
MODEL_CACHE_MANIFEST = "peftbench-cache.json"

#: The parameter generator's (seed 004) directory, one per ``generator.name``: ``data/`` (rule
#: ``tokenize_params``: :data:`GENERATOR_DATA_FILES`), ``{split}/`` (``train_generator`` and
#: ``evaluate_generator``: :data:`GENERATOR_SPLIT_FILES`), the summary (:data:`GENERATOR_SUMMARY`)
#: and the figures (:data:`GENERATOR_PLOTS`).
GENERATOR_DIR = "results/generator/{name}"
#: Files of the generator dataset (``{GENERATOR_DIR}/data/``, :mod:`peftbench.generator.dataset`).
GENERATOR_DATA_FILES: dict[str, str] = {"params": "params.safetensors", "checkpoints": "checkpoints.parquet",
                                        "layout": "layout.parquet", "prompts": "prompts.parquet",
                                        "splits": "splits.parquet"}
#: Files of one split (``{GENERATOR_DIR}/{split}/``): the trained generator, its curve and manifest
#: (:mod:`peftbench.generator.fit`), the evaluation tables and generated peft adapters
#: (:mod:`peftbench.generator.evaluate`).
GENERATOR_SPLIT_FILES: dict[str, str] = {"weights": "generator.safetensors", "curve": "curve.parquet",
                                         "manifest": "manifest.parquet", "evaluation": "evaluation.parquet",
                                         "reconstruction": "reconstruction.parquet",
                                         "errors_by_matrix": "errors_by_matrix.parquet", "adapters": "adapters"}
#: The generator summary (``{GENERATOR_DIR}/``): one row per (split, task).
GENERATOR_SUMMARY: dict[str, str] = {"table": "summary.parquet", "markdown": "summary.md"}

#: Figures of the parameter generator (seed 004; ``results/generator/{name}/{kind}.pdf`` + ``.png``,
#: rule ``generator_report``, :func:`peftbench.generator.report.plot`) -> the file each reads from
#: every split (a key of :data:`GENERATOR_SPLIT_FILES`; ``summary``: the :data:`GENERATOR_SUMMARY` table).
GENERATOR_PLOTS: dict[str, str] = {
    "generator_curves": "curve",
    "generator_metric": "summary",
    "generator_errors": "errors_by_matrix",
}

#: Plot kinds drawn only when the tuning stage runs (``tuning.enabled``): they read its tables.
TUNING_PLOTS: tuple[str, ...] = tuple(k for k, p in PLOTS.items() if "trials" in p.inputs)
#: Plot kinds drawn only when ``ood.sets`` names a set for a task of the grid: they read the OOD tables.
OOD_PLOTS: tuple[str, ...] = tuple(k for k, p in PLOTS.items() if "ood" in p.inputs)
