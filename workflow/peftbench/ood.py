"""Out-of-distribution (OOD) evaluation: a trained run scored on other data sets.

The ``evaluate_ood`` rule runs :func:`evaluate_ood` once per finished run whose task has OOD sets
in the config (``ood.sets.<task>``). It rebuilds the run's model exactly as training built it
(:func:`peftbench.train.build_model`, same key, recipe and step counts read from the run's
``metrics.parquet``), loads ``adapter.safetensors`` into it (every tensor by name; a missing or
misshaped tensor is an error naming it), tokenises each OOD set with the model's tokenizer and
scores it: the model's argmax class and the set's gold label are both mapped onto the scored
classes of :data:`peftbench.vocab.OOD_MAPS` (the one table of label-space mappings) and accuracy
is computed there. Output: ``ood.parquet`` in the run directory (:data:`OOD_COLUMNS`), collected
into ``results/tables/ood.parquet`` by the ``aggregate_ood`` rule.

Sets (:data:`peftbench.vocab.OOD_SETS`): ANLI rounds 1–3 dev (Nie et al. 2020, arXiv:1910.14599;
CC BY-NC 4.0) from ``data.anli_dir`` (``{anli_dir}/dev_r{k}.parquet``, the ``facebook/anli``
schema) or the hub; HANS (McCoy et al. 2019, arXiv:1902.01007) from the hub only. Scoring RTE
models on ANLI maps neutral and contradiction to not_entailment: a documented proxy (RTE has two
classes, ANLI three).

Only what :meth:`~peftbench.methods.base.Method.state_to_save` writes is restored; a method whose
inference depends on other state (buffers it changes, masks outside parameters) would be scored
as freshly built with the trained parameters. So the stage first re-scores the run's own main dev
split with the reloaded model (``reload_dev_main``) and compares it with the logged ``dev_main``
(``reload_matches``: within :data:`RELOAD_TOLERANCE`; a mismatch is logged as an error, and the
OOD numbers of that row are not of the trained model).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .vocab import OOD_MAPS, OOD_SETS, TASKS, OODMap, OODSet

log = logging.getLogger(__name__)

#: Columns of ``ood.parquet`` after the run key's.
OOD_COLUMNS = ["ood_set", "train_task", "n", "accuracy", "scored_classes", "mapping", "source",
               "reload_dev_main", "reload_matches"]
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


def score(logits: np.ndarray, gold: np.ndarray, mapping: OODMap) -> float:
    """Accuracy in the scored classes: ``mean(pred[argmax(logits)] == gold_map[gold])``.

    Args:
        logits: ``(n, num_labels)`` of the training task. gold: ``(n,)`` the set's class ids.
    """
    pred = np.vectorize(mapping.pred.__getitem__)(np.asarray(logits).argmax(axis=1))
    g = np.vectorize(mapping.gold.__getitem__)(np.asarray(gold).astype(int))
    return float(np.mean(pred == g))


def evaluate_ood(*, key, model_spec: str, run_dir: str | Path, sets: list[str], out: str | Path,
                 max_length: int, dev_path: str | Path | None = None, anli_dir: str | Path | None = None, recipe=None, runtime=None,
                 svd_path: str | Path | None = None, budget_denominator: str | None = None,
                 device: str | None = None) -> pd.DataFrame:
    """Score the trained run ``key`` (its ``run_dir``) on every OOD set of ``sets``; write ``out``.

    Args:
        dev_path: the tokenised main dev split of the run's task (the reload check; ``None``:
            ``reload_dev_main`` NaN, ``reload_matches`` None).

    Returns:
        The ``ood.parquet`` table: run key columns, then :data:`OOD_COLUMNS` (one row per set;
        ``accuracy`` a fraction in the scored classes).

    Raises:
        ValueError: a set or mapping :func:`check_ood` rejects; an adapter tensor the rebuilt
            model lacks or whose shape differs (names it).
        FileNotFoundError: no ``adapter.safetensors`` / ``metrics.parquet`` in ``run_dir``.
    """
    import pyarrow as pa
    import torch

    from .batches import TokenizedSplit
    from safetensors.torch import load_file

    from .io import write_table
    from .models import load_tokenizer
    from .recipe import Recipe, Runtime
    from .tokenization import encode_table
    from .train import build_model, evaluate, load_adapter
    from .vocab import RUN_FILES, get_task

    task = get_task(key.task)
    maps = {name: check_ood(key.task, name) for name in sets}
    recipe = recipe or Recipe.from_dict({})
    runtime = runtime or Runtime.from_dict({})
    run_dir = Path(run_dir)
    for f in (RUN_FILES["adapter"], RUN_FILES["metrics"]):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir / f} not found; train the run first (rule train)")
    m = pd.read_parquet(run_dir / RUN_FILES["metrics"]).iloc[0]
    total = int(m["steps"])
    epochs = max(int(m["epochs"]), 1)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(key.seed)
    model, method, _ = build_model(model_spec, task, key, recipe, max(total // epochs, 1), total, dev, svd_path,
                                   budget_denominator)
    load_adapter(model, load_file(run_dir / RUN_FILES["adapter"]), f"{run_dir / RUN_FILES['adapter']} ({key.method})")
    model = model.to(dev)
    reload_main, matches = float("nan"), None
    if dev_path is not None:
        split_name = task.eval_splits[0]
        metrics, _ = evaluate(model, method, task, {split_name: TokenizedSplit(dev_path, recipe.max_eval_samples)},
                              dev, runtime.eval_batch_size, dev.type == "cuda")
        reload_main = float(metrics[task.main_metric])
        matches = bool(abs(reload_main - float(m["dev_main"])) <= RELOAD_TOLERANCE)
        if not matches:
            log.error("%s: the reloaded model scores %s %.6f on %s, the run logged %.6f; the OOD numbers below "
                      "are not of the trained model (method state outside adapter.safetensors?)", key,
                      task.main_metric, reload_main, split_name, float(m["dev_main"]))
    tok = load_tokenizer(model_spec)
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
                                 dev.type == "cuda")
            acc = score(logits["validation"], df["label"].to_numpy(), mapping)
            log.info("%s on %s (%s): accuracy %.4f over %d examples", key, name, source, acc, len(df))
            rows.append({**key.columns(), "ood_set": name, "train_task": key.task, "n": len(df), "accuracy": acc,
                         "scored_classes": ",".join(mapping.classes), "mapping": mapping.note, "source": source,
                         "reload_dev_main": reload_main, "reload_matches": matches})
    out_df = pd.DataFrame(rows, columns=[*key.columns(), *OOD_COLUMNS])
    write_table(out_df, out)
    return out_df
