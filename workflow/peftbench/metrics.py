"""Dev-set metrics: GLUE with scikit-learn and scipy, generation (causal-LM track) with sacrebleu,
rouge-score and nltk (no download at run time; METEOR needs the WordNet corpus). Each library is
imported where its metric is computed, so a training job imports only what its task scores;
accuracy, the fraction of correct predictions, is computed with numpy. (Measured on the 2-core
CPU, this saves only ~0.2 s per accuracy-only job: transformers' model import already pulls in
most of scipy through ``scipy.optimize``.)

CoLA: Matthews correlation (Matthews 1975) and accuracy; STS-B: Pearson and Spearman correlation
of the regression output with the gold score; MRPC/QQP: accuracy and F1 of the positive class;
every other task: accuracy. Values are fractions, not percentages.
"""
from __future__ import annotations

import numpy as np

from .vocab import TaskSpec, split_suffix


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    """The fraction of ``(n,)`` predictions equal to their ``(n,)`` gold labels (what
    ``sklearn.metrics.accuracy_score`` returns, without importing scikit-learn)."""
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def compute_metrics(task: TaskSpec, logits: np.ndarray, labels: np.ndarray, split: str) -> dict[str, float]:
    """Score one evaluation split.

    Args:
        task: the task's spec (decides metric set and whether it is a regression).
        logits: ``(n, num_labels)`` model outputs; STS-B ``(n, 1)`` or ``(n,)`` scores.
        labels: ``(n,)`` gold class ids (int) or scores (float, STS-B).
        split: the eval split's name; for MNLI its suffix is appended to every metric name.

    Returns:
        ``{metric_name: value}`` with the names of :meth:`TaskSpec.metric_names`.

    Raises:
        ValueError: lengths differ or the split is empty.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"{task.name}/{split}: {len(logits)} predictions for {len(labels)} labels")
    out: dict[str, float] = {}
    if task.is_regression:
        from scipy.stats import pearsonr, spearmanr

        pred = logits.reshape(len(logits), -1)[:, 0]
        gold = labels.astype(np.float64)
        # A constant prediction (e.g. a collapsed model) has no correlation: report 0, not NaN.
        const = np.ptp(pred) == 0 or np.ptp(gold) == 0
        out["pearson"] = 0.0 if const else float(pearsonr(pred, gold).statistic)
        out["spearman"] = 0.0 if const else float(spearmanr(pred, gold).statistic)
    else:
        pred = logits.argmax(axis=-1)
        gold = labels.astype(np.int64)
        for name in task.metrics:
            if name == "accuracy":
                out[name] = accuracy(gold, pred)
            elif name == "f1":
                from sklearn.metrics import f1_score

                out[name] = float(f1_score(gold, pred, zero_division=0.0))
            elif name == "matthews_correlation":
                from sklearn.metrics import matthews_corrcoef

                out[name] = float(matthews_corrcoef(gold, pred))
            else:  # pragma: no cover - the task table only names the metrics above
                raise ValueError(f"no implementation for metric {name!r}")
    if len(task.eval_splits) > 1:
        out = {f"{k}_{split_suffix(split)}": v for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------
# Causal-LM track: generation metrics from maintained libraries
# ------------------------------------------------------------------------------------------------

def normalise_answer(text: str) -> str:
    """Lower-cased, whitespace-normalised text (runs of whitespace → one space, stripped): the
    comparison of :func:`exact_match`."""
    return " ".join(str(text).lower().split())


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Fraction of predictions equal to one of their references after :func:`normalise_answer`
    (case-insensitive, whitespace-normalised; the WikiSQL logical-form match of Zhong et al. 2017,
    arXiv:1709.00103, on the human-readable SQL)."""
    hits = [normalise_answer(p) in {normalise_answer(r) for r in refs} for p, refs in zip(predictions, references)]
    return float(np.mean(hits))


def bleu(predictions: list[str], references: list[list[str]], order: int) -> float:
    """Corpus BLEU of n-gram order ``order`` with sacrebleu (Papineni et al. 2002; Post 2018,
    arXiv:1804.08771: ``13a`` tokenisation, exponential smoothing, several references per example),
    as a fraction (sacrebleu's score / 100). BLEU-n is the cumulative score with uniform weights
    over 1..n-grams (``max_ngram_order = n``)."""
    from sacrebleu.metrics import BLEU

    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(BLEU(max_ngram_order=order).corpus_score(list(predictions), streams).score) / 100.0


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure with Google's ``rouge-score`` (Lin 2004; Porter stemming on,
    the setting of the SAMSum and E2E evaluations), the best reference per example
    (``RougeScorer.score_multi``). ROUGE-Lsum splits summaries into sentences at newlines."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score_multi(list(refs), pred) for pred, refs in zip(predictions, references)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_TYPES}


class MeteorDataError(RuntimeError):
    """nltk's METEOR needs the WordNet corpus, which is not installed."""


def meteor(predictions: list[str], references: list[list[str]]) -> float:
    """Mean sentence METEOR with nltk (Banerjee & Lavie 2005: exact, Porter-stem and WordNet-synonym
    matching, α = 0.9, β = 3, γ = 0.5), whitespace tokens, several references per example.

    Raises:
        MeteorDataError: the WordNet corpus is not installed (nltk's METEOR reads its synonyms
            from it; the message says how to install it). It is data, not a pip package, so
            offline machines have it only where someone copied it into an ``NLTK_DATA`` folder.
    """
    import nltk
    from nltk.translate.meteor_score import meteor_score

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            raise MeteorDataError("METEOR needs nltk's WordNet corpus. Fix: python -m nltk.downloader wordnet "
                                  "(where the network is reachable), or copy corpora/wordnet into a folder "
                                  "on NLTK_DATA") from None
    return float(np.mean([meteor_score([r.split() for r in refs], pred.split())
                          for pred, refs in zip(predictions, references)]))


def require_metric_data(task: TaskSpec) -> None:
    """Fail before training when a metric of ``task`` cannot be computed here (METEOR without
    nltk's WordNet corpus), rather than after the first epoch.

    Raises:
        MeteorDataError: see :func:`meteor`.
    """
    if "meteor" in task.metrics:
        meteor(["a"], [["a"]])


def compute_generation_metrics(task: TaskSpec, predictions: list[str], references: list[list[str]],
                               labels: np.ndarray, split: str) -> dict[str, float]:
    """Score one evaluation split of a causal-LM task from the generated texts.

    Verbaliser tasks (RTE/SST-2/MNLI as generation): accuracy of the class each generation names
    (:func:`peftbench.generation.verbalise`; an answer naming no class is wrong), with
    scikit-learn. Text tasks: the task's metrics among BLEU-1…4 (:func:`bleu`), ROUGE-1/2/L/Lsum
    (:func:`rouge`), METEOR (:func:`meteor`) and exact match (:func:`exact_match`).

    Args:
        predictions: ``n`` generated texts (the prompt not included).
        references: ``n`` lists of reference texts.
        labels: ``(n,)`` gold class ids (verbaliser tasks; -1 otherwise).
        split: the eval split's name (MNLI: its suffix is appended to every metric name).

    Returns:
        ``{metric_name: value}`` (fractions) with the names of :meth:`TaskSpec.metric_names`.

    Raises:
        ValueError: lengths differ or the split is empty. MeteorDataError: see :func:`meteor`.
    """
    from .generation import verbalise

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{task.name}/{split}: {len(predictions)} generations for {len(references)} references")
    out: dict[str, float] = {}
    want = set(task.metrics)
    if task.verbaliser is not None:
        pred = np.array([verbalise(p, task.verbaliser) for p in predictions])
        out["accuracy"] = accuracy(np.asarray(labels, dtype=np.int64), pred)
    else:
        for n in (1, 2, 3, 4):
            if f"bleu{n}" in want:
                out[f"bleu{n}"] = bleu(predictions, references, n)
        if want & set(ROUGE_TYPES):
            out.update({k: v for k, v in rouge(predictions, references).items() if k in want})
        if "meteor" in want:
            out["meteor"] = meteor(predictions, references)
        if "exact_match" in want:
            out["exact_match"] = exact_match(predictions, references)
    missing = want - set(out)
    if missing:  # pragma: no cover - the task table only names the metrics above
        raise ValueError(f"no implementation for metric(s) {sorted(missing)}")
    out = {k: out[k] for k in task.metrics}
    if len(task.eval_splits) > 1:
        out = {f"{k}_{split_suffix(split)}": v for k, v in out.items()}
    return out
