#!/usr/bin/env python
"""Build the small real GLUE sample shipped in ``workflow/data/glue-sample``.

The sample lets a fresh clone run its tests and the quickstart offline. For each quickstart task
(stsb, cola, sst2) it holds:

* the FULL ``validation`` split (dev metrics are then the real GLUE dev metrics);
* a fixed random subset of ``--train-rows`` training rows (``numpy.random.default_rng(0)``,
  drawn without replacement, rows kept in their original order);
* for cola also ``--test-rows`` rows of the ``test`` split (hidden labels, ``-1``), drawn the
  same way (a test checks that hidden test labels are accepted).

Any source in the ``nyu-mll/glue`` schema works: ``--source hub`` reads
``datasets.load_dataset("nyu-mll/glue", task)`` from the Hugging Face hub, ``--source DIR`` reads a
local mirror ``DIR/{task}/{split}.parquet`` (e.g. ``../shared/data/glue``). Both are read through
the project's own loader, ``peftbench.data.load_split``, so the sample passes the same checks as
the data a run reads.

Each output file ``{out}/{task}/{split}.parquet`` is zstd-compressed Parquet with the source's
column names and dtypes (text ``string``, ``label`` int64 / float32 for stsb, ``idx`` int32, kept
as in the source) and the Hugging Face feature spec in the Parquet schema metadata (key
``huggingface``: copied from the mirror file, or built from the hub's ``datasets.Features``), so
``datasets.load_dataset("parquet", ...)`` restores the ClassLabel names.

Example (the command that built the shipped sample, run from the repository root)::

    python workflow/scripts/build_glue_sample.py --source ../shared/data/glue \
        --out workflow/data/glue-sample
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # <repo>/workflow

from peftbench.data import HUB_ID, load_split, split_path  # noqa: E402

try:  # the task table: peftbench.vocab, or peftbench.tasks before the move
    from peftbench.vocab import get_task  # noqa: E402
except ImportError:
    from peftbench.tasks import get_task  # noqa: E402

TASKS = ("stsb", "cola", "sst2")
TEST_TASKS = ("cola",)  # tasks that also ship a slice of their (hidden-label) test split
SEED = 0
HF_KEY = b"huggingface"


def subset_rows(n: int, k: int | None, seed: int = SEED) -> np.ndarray:
    """Row positions of a fixed random subset of ``k`` of ``n`` rows, in their original order.

    ``k`` of ``None`` (or ``k >= n``) keeps every row.
    """
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def source_schema(source: str, task: str, split: str) -> pa.Schema:
    """The Arrow schema (with the ``huggingface`` metadata) the output file should have.

    For a local mirror: the source file's own schema and metadata, read with pyarrow. For the
    hub: the schema of the ``datasets.Features`` of ``nyu-mll/glue/{task}`` (cached by the
    ``load_split`` call before), with ``{"info": {"features": ...}}`` as ``datasets`` writes it.
    """
    if source != "hub":
        schema = pq.read_schema(split_path(source, task, split))
        if not schema.metadata or HF_KEY not in schema.metadata:
            raise SystemExit(f"{split_path(source, task, split)}: no '{HF_KEY.decode()}' schema metadata; "
                             f"the sample must carry the HF feature spec")
        return schema
    from datasets import load_dataset

    features = load_dataset(HUB_ID, task, split=split).features
    meta = {HF_KEY: json.dumps({"info": {"features": features.to_dict()}}).encode()}
    return features.arrow_schema.remove_metadata().with_metadata(meta)


def build_split(source: str, task: str, split: str, rows: int | None, out: Path) -> tuple[int, int, int]:
    """Write ``{out}/{task}/{split}.parquet``; return (rows kept, rows in the source, bytes)."""
    df = load_split(get_task(task), split, None if source == "hub" else source)
    n_source = len(df)
    keep = subset_rows(n_source, rows)
    schema = source_schema(source, task, split)
    df = df.iloc[keep][schema.names]
    table = pa.Table.from_pandas(df, schema=schema.remove_metadata(), preserve_index=False)
    table = table.replace_schema_metadata(schema.metadata)
    path = out / task / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    # read back: same schema, metadata included, and the rows asked for
    back = pq.read_table(path)
    assert back.schema.equals(schema, check_metadata=True), (path, back.schema, schema)
    assert back.num_rows == len(keep)
    return len(keep), n_source, path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--source", required=True,
                   help="'hub' (nyu-mll/glue from the Hugging Face hub) or a local mirror directory "
                        "holding {task}/{split}.parquet in the nyu-mll/glue schema")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "glue-sample",
                   help="output directory (default: workflow/data/glue-sample)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"tasks (default: {' '.join(TASKS)})")
    p.add_argument("--train-rows", type=int, default=2000,
                   help="training rows per task, a fixed random subset (default: 2000)")
    p.add_argument("--test-rows", type=int, default=200,
                   help=f"test rows (hidden labels) for {', '.join(TEST_TASKS)} (default: 200)")
    a = p.parse_args(argv)
    if a.source != "hub" and not Path(a.source).is_dir():
        p.error(f"--source {a.source}: not 'hub' and not a directory")

    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # load_split then reads a mirror with pyarrow
        pass
    total = 0
    for task in a.tasks:
        plan = [("train", a.train_rows), ("validation", None)]
        if task in TEST_TASKS:
            plan.append(("test", a.test_rows))
        for split, rows in plan:
            kept, n_source, size = build_split(a.source, task, split, rows, a.out)
            total += size
            print(f"{task}/{split}: {kept} of {n_source} rows, {size} bytes")
    print(f"total: {total} bytes in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
