"""Out-of-distribution (OOD) evaluation: a trained run scored on other data sets.

The ``evaluate_ood`` rule runs :func:`evaluate_ood` once per finished run whose task has OOD sets
in the config (``ood.sets.<task>``). It rebuilds the run's model exactly as training built it
(:func:`peftbench.train.build_model`, same key, recipe and step counts read from the run's
``metrics.parquet``), loads ``adapter.safetensors`` into it (every tensor by name; a missing or
misshaped tensor is an error naming it), tokenises each OOD set with the model's tokenizer and
scores it: the model's argmax class and the set's gold label are both mapped onto the scored
classes of :data:`peftbench.vocab.OOD_MAPS` (the one table of label-space mappings) and accuracy
is computed there, over the whole set (the headline row, :func:`headline`) and, for a set that
declares a breakdown (HANS: heuristic × gold label, and subcase), per subset
(:func:`breakdown_rows`). Output: ``ood.parquet`` in the run directory (:data:`OOD_COLUMNS`),
collected into ``results/tables/ood.parquet`` by the ``aggregate_ood`` rule.

Sets (:data:`peftbench.vocab.OOD_SETS`): ANLI rounds 1–3 dev (Nie et al. 2020, arXiv:1910.14599;
CC BY-NC 4.0) from ``data.anli_dir`` (``{anli_dir}/dev_r{k}.parquet``, the ``facebook/anli``
schema) or the hub; HANS (McCoy et al. 2019, arXiv:1902.01007) from the hub only. Scoring RTE
models on ANLI maps neutral and contradiction to not_entailment: a documented proxy (RTE has two
classes, ANLI three).

The reload (:func:`peftbench.checkpoint.load_trained`) follows the resume path: the method state
the run wrote at its end (``method_state.pt``, :meth:`~peftbench.methods.base.Method.checkpoint_state`)
is restored first, so a method whose structure changed during training (GLoRA and its controls
re-allocate ranks and resize their LoRA factors; AdaLoRA's rank pattern) rebuilds it, then
``adapter.safetensors`` (:meth:`~peftbench.methods.base.Method.state_to_save`) is loaded. The stage
then re-scores the run's own main dev split with the reloaded model (``reload_dev_main``) and
compares it with the logged ``dev_main`` (``reload_matches``: within :data:`RELOAD_TOLERANCE`; a
mismatch is logged as an error, and the OOD numbers of that row are not of the trained model).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .vocab import OOD_ALL, OOD_MAPS, OOD_SETS, TASKS, OODMap, OODSet

log = logging.getLogger(__name__)

#: Columns of ``ood.parquet`` after the run key's. ``breakdown``, ``subset``, ``gold_class``:
#: :data:`~peftbench.vocab.OOD_ALL` on the headline row over the whole set; on a breakdown row
#: (:func:`breakdown_rows`) the set's column, its value and the gold class (the set's own label name).
OOD_COLUMNS = ["ood_set", "breakdown", "subset", "gold_class", "train_task", "n", "accuracy", "scored_classes",
               "mapping", "source", "reload_dev_main", "reload_matches"]
#: ``reload_matches``: the reloaded model's main dev metric is within this of the logged ``dev_main``.
RELOAD_TOLERANCE = 1e-4


def check_ood(task: str, name: str, maps: dict | None = None, sets: dict | None = None) -> OODMap:
    """The mapping for scoring ``task``-trained runs on OOD set ``name``, checked.

    Raises:
        ValueError: an unknown set (lists the known ones), no mapping for ``(task, name)`` (lists
            the declared pairs), or a mapping that leaves out a class of the set (``gold``) or of
            the task (``pred``), or maps onto a class outside ``classes``; the message names it.
    """
    maps = OOD_MAPS if maps is None else maps
    sets = OOD_SETS if sets is None else sets
    if name not in sets:
        raise ValueError(f"unknown OOD set {name!r}; known: {list(sets)}")
    if (task, name) not in maps:
        raise ValueError(f"no label mapping for OOD set {name!r} after training on {task!r}; declared "
                         f"(task, set) pairs: {sorted(maps)} (add one to peftbench.vocab.OOD_MAPS)")
    m, s, t = maps[(task, name)], sets[name], TASKS[task]
    for side, mapping, n_classes, what in (("gold", m.gold, len(s.classes), f"set {name}"),
                                           ("pred", m.pred, t.num_labels, f"task {task}")):
        lacking = [c for c in range(n_classes) if c not in mapping]
        if lacking:
            raise ValueError(f"label map ({task}, {name}).{side} misses class(es) {lacking} of {what}; "
                             f"map every class onto one of {list(m.classes)}")
        bad = sorted({v for v in mapping.values() if not 0 <= v < len(m.classes)})
        if bad:
            raise ValueError(f"label map ({task}, {name}).{side} maps onto {bad}, outside the scored classes "
                             f"{list(m.classes)}")
    return m


def load_ood_set(spec: OODSet, anli_dir: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """Load one OOD set: ``(frame with the text columns, label, idx; source)``.

    ``anli_dir`` holds ``{local}`` files for the sets that have one (ANLI); otherwise the hub
    (``datasets.load_dataset(hub_id, split=split)``).

    Raises:
        FileNotFoundError: the local file is missing (names it and both fixes).
        RuntimeError: the hub cannot be reached.
    """
    if anli_dir is not None and spec.local is not None:
        path = Path(anli_dir) / spec.local
        if not path.is_file():
            raise FileNotFoundError(f"OOD set {spec.name}: {path} not found. Fix: point data.anli_dir at a "
                                    f"directory holding {spec.local} ({spec.hub_id} schema), or set it to null "
                                    f"to read {spec.hub_id} from the hub")
        df, source = pd.read_parquet(path), str(path)
    else:
        try:
            from datasets import load_dataset

            df = load_dataset(spec.hub_id, spec.hub_config, split=spec.split).to_pandas()
        except Exception as exc:  # network errors come in many types
            raise RuntimeError(f"could not load OOD set {spec.name} ({spec.hub_id}, split {spec.split}) from the "
                               f"hub ({exc})" + (". Fix: set data.anli_dir to a local copy" if spec.local else
                                                 "; this set is hub-only")) from exc
        source = f"{spec.hub_id}/{spec.split}"
    missing = [c for c in (*spec.text_columns, "label") if c not in df.columns]
    if missing:
        raise ValueError(f"OOD set {spec.name} ({source}): missing column(s) {missing}")
    df = df.reset_index(drop=True)
    df["idx"] = np.arange(len(df))
    return df, source


def correct(logits: np.ndarray, gold: np.ndarray, mapping: OODMap) -> np.ndarray:
    """Per example, whether the prediction is right in the scored classes:
    ``pred_map[argmax(logits)] == gold_map[gold]``, ``(n,)`` bool.

    Args:
        logits: ``(n, num_labels)`` of the training task. gold: ``(n,)`` the set's class ids.
    """
    pred = np.vectorize(mapping.pred.__getitem__, otypes=[int])(np.asarray(logits).argmax(axis=1))
    g = np.vectorize(mapping.gold.__getitem__, otypes=[int])(np.asarray(gold).astype(int))
    return pred == g


def score(logits: np.ndarray, gold: np.ndarray, mapping: OODMap) -> float:
    """Accuracy in the scored classes: the mean of :func:`correct`."""
    return float(np.mean(correct(logits, gold, mapping)))


def breakdown_rows(df: pd.DataFrame, right: np.ndarray, spec: OODSet) -> list[dict]:
    """Accuracy per value of each of ``spec.breakdown``'s columns, crossed with the gold class.

    HANS (McCoy et al. 2019, arXiv:1902.01007, Table 1 and Fig. 1): per heuristic (lexical overlap,
    subsequence, constituent) × gold label (entailment: the heuristic's prediction is right;
    non-entailment: it is wrong, where a model relying on it fails), and per subcase (each within
    one heuristic and one label).

    Args:
        df: the set (its ``label`` and breakdown columns), row order of ``right``.
        right: ``(n,)`` bool, :func:`correct`.

    Returns:
        Rows ``{breakdown, subset, gold_class, n, accuracy}``, in the order of ``spec.breakdown``,
        then of first appearance (subsets) and class id (gold classes); combinations without
        examples are left out.

    Raises:
        ValueError: a breakdown column is missing from ``df``.
    """
    missing = [c for c in spec.breakdown if c not in df.columns]
    if missing:
        raise ValueError(f"OOD set {spec.name}: missing breakdown column(s) {missing}")
    gold = np.asarray(df["label"]).astype(int)
    rows = []
    for col in spec.breakdown:
        values = df[col].astype(str).to_numpy()
        for v in dict.fromkeys(values):
            for c, name in enumerate(spec.classes):
                sel = (values == v) & (gold == c)
                if sel.any():
                    rows.append({"breakdown": col, "subset": v, "gold_class": name, "n": int(sel.sum()),
                                 "accuracy": float(right[sel].mean())})
    return rows


def headline(ood: pd.DataFrame) -> pd.DataFrame:
    """The rows of an ``ood.parquet`` table over whole sets (one per run and set); a table written
    before the breakdown columns existed has only such rows."""
    if "breakdown" not in ood.columns:
        return ood
    return ood[ood["breakdown"] == OOD_ALL]


def reload_run(*, key, model_spec: str, run_dir: str | Path, recipe, device, svd_path: str | Path | None = None,
               budget_denominator: str | None = None, model_cache: str | Path | None = None):
    """The trained model of run ``key``, rebuilt and reloaded on ``device``, in eval mode.

    The model is built as training built it (:func:`peftbench.train.build_model`: same key, recipe
    and step counts, read from the run's ``metrics.parquet``; the torch seed is the run's), then
    :func:`peftbench.checkpoint.load_trained` restores ``method_state.pt`` (re-allocated ranks …)
    and loads ``adapter.safetensors``. The backbone comes from the model cache ``model_cache`` when
    given (:mod:`peftbench.modelcache`), else from the spec.

    Returns:
        ``(model, method, metrics_row)``: the metrics row a ``pandas.Series``.

    Raises:
        FileNotFoundError: ``adapter.safetensors``, ``method_state.pt`` or ``metrics.parquet``
            missing in ``run_dir``.
        ValueError: an adapter tensor that does not fit the rebuilt model (names it).
    """
    import torch

    from .checkpoint import load_trained
    from .train import build_model
    from .vocab import RUN_FILES, get_task

    run_dir = Path(run_dir)
    for f in (RUN_FILES["adapter"], RUN_FILES["method_state"], RUN_FILES["metrics"]):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir / f} not found; train the run first (rule train)")
    m = pd.read_parquet(run_dir / RUN_FILES["metrics"]).iloc[0]
    total = int(m["steps"])
    epochs = max(int(m["epochs"]), 1)
    torch.manual_seed(key.seed)
    model, method, _ = build_model(model_spec, get_task(key.task), key, recipe, max(total // epochs, 1), total,
                                   torch.device(device), svd_path, budget_denominator, model_cache)
    load_trained(model, method, run_dir)
    return model.to(device).eval(), method, m


def run_precision(metrics_row, recipe, device) -> str:
    """The precision (``fp32`` / ``bf16``) a finished run used: its ``precision`` column, or (runs
    written before the column existed) the recipe's ``precision`` resolved on ``device``."""
    from .precision import resolve_precision

    value = metrics_row.get("precision") if hasattr(metrics_row, "get") else None
    if isinstance(value, str) and value in ("fp32", "bf16"):
        return value
    return resolve_precision(recipe.precision, device)


def evaluate_ood(*, key, model_spec: str, run_dir: str | Path, sets: list[str], out: str | Path,
                 max_length: int, dev_path: str | Path | None = None, anli_dir: str | Path | None = None, recipe=None, runtime=None,
                 svd_path: str | Path | None = None, budget_denominator: str | None = None,
                 device: str | None = None, model_cache: str | Path | None = None) -> pd.DataFrame:
    """Score the trained run ``key`` (its ``run_dir``) on every OOD set of ``sets``; write ``out``.

    Args:
        dev_path: the tokenised main dev split of the run's task (the reload check; ``None``:
            ``reload_dev_main`` NaN, ``reload_matches`` None).
        model_cache: the spec's model cache folder (:mod:`peftbench.modelcache`): the backbone and
            tokenizer are loaded from it; ``None``: from the spec.

    Returns:
        The ``ood.parquet`` table: run key columns, then :data:`OOD_COLUMNS`: per set one headline
        row (``breakdown == "all"``) and the :func:`breakdown_rows` of sets that declare a
        breakdown (HANS); ``accuracy`` a fraction in the scored classes.

    Raises:
        ValueError: a set or mapping :func:`check_ood` rejects; an adapter tensor the rebuilt
            model lacks or whose shape differs (names it).
        FileNotFoundError: no ``adapter.safetensors`` / ``method_state.pt`` / ``metrics.parquet`` in
            ``run_dir``.
    """
    import pyarrow as pa
    import torch

    from .batches import TokenizedSplit
    from .io import write_table
    from .models import load_tokenizer
    from .recipe import Recipe, Runtime
    from .tokenization import encode_table
    from .train import evaluate
    from .vocab import get_task

    task = get_task(key.task)
    maps = {name: check_ood(key.task, name) for name in sets}
    recipe = recipe or Recipe.from_dict({})
    runtime = runtime or Runtime.from_dict({})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, method, m = reload_run(key=key, model_spec=model_spec, run_dir=run_dir, recipe=recipe, device=dev,
                                  svd_path=svd_path, budget_denominator=budget_denominator, model_cache=model_cache)
    # evaluate at the precision the run trained and was scored at (its metrics row), not at what
    # ``precision: auto`` would resolve to on this machine
    autocast = run_precision(m, recipe, dev) == "bf16"
    reload_main, matches = float("nan"), None
    if dev_path is not None:
        split_name = task.eval_splits[0]
        metrics, _ = evaluate(model, method, task, {split_name: TokenizedSplit(dev_path, recipe.max_eval_samples)},
                              dev, runtime.eval_batch_size, autocast)
        reload_main = float(metrics[task.main_metric])
        matches = bool(abs(reload_main - float(m["dev_main"])) <= RELOAD_TOLERANCE)
        if not matches:
            log.error("%s: the reloaded model scores %s %.6f on %s, the run logged %.6f; the OOD numbers below "
                      "are not of the trained model (inference state outside method_state.pt and "
                      "adapter.safetensors?)", key,
                      task.main_metric, reload_main, split_name, float(m["dev_main"]))
    tok = load_tokenizer(model_spec, model_cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sets:
            spec, mapping = OOD_SETS[name], maps[name]
            df, source = load_ood_set(spec, anli_dir)
            table, _ = encode_table(tok, df, spec.text_columns, max_length,
                                    pa.array(df["label"].to_numpy().astype(np.int64), type=pa.int64()))
            path = Path(tmp) / f"{name}.parquet"
            write_table(table, path, metadata={"pad_token_id": int(tok.pad_token_id or 0)})
            split = TokenizedSplit(path)
            _, logits = evaluate(model, method, task, {"validation": split}, dev, runtime.eval_batch_size,
                                 autocast)
            right = correct(logits["validation"], df["label"].to_numpy(), mapping)
            acc = float(right.mean())
            log.info("%s on %s (%s): accuracy %.4f over %d examples", key, name, source, acc, len(df))
            common = {"train_task": key.task, "scored_classes": ",".join(mapping.classes), "mapping": mapping.note,
                      "source": source, "reload_dev_main": reload_main, "reload_matches": matches}
            for r in [{"breakdown": OOD_ALL, "subset": OOD_ALL, "gold_class": OOD_ALL, "n": len(df), "accuracy": acc},
                      *breakdown_rows(df, right, spec)]:
                rows.append({**key.columns(), "ood_set": name, **r, **common})
    out_df = pd.DataFrame(rows, columns=[*key.columns(), *OOD_COLUMNS])
    write_table(out_df, out)
    return out_df
