"""Build workflow/data/ood-sample/anli/dev_r{1,2,3}.parquet: a small slice of ANLI dev, shipped so
the OOD stage's test runs offline (tests only; research runs read the full sets).

ANLI (Nie et al. 2020, "Adversarial NLI", arXiv:1910.14599; hub ``facebook/anli``) is licensed
CC BY-NC 4.0; the slice keeps that licence (see the README beside it).

Usage: python workflow/scripts/build_ood_sample.py [--src /work/shared/data/anli] [--rows 40]

Rows: ``numpy.random.default_rng(0).choice(n, size=rows, replace=False)``, sorted, a fresh
generator per round; columns ``uid``, ``premise``, ``hypothesis``, ``label`` (int64: 0
entailment, 1 neutral, 2 contradiction) as in ``facebook/anli`` (``reason`` dropped).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "data" / "ood-sample" / "anli"
ROUNDS = ("dev_r1", "dev_r2", "dev_r3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=Path("/work/shared/data/anli"), help="ANLI mirror ({split}.parquet)")
    p.add_argument("--rows", type=int, default=40, help="rows per round")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for split in ROUNDS:
        df = pd.read_parquet(a.src / f"{split}.parquet")
        rows = np.sort(np.random.default_rng(0).choice(len(df), size=a.rows, replace=False))
        out = df.iloc[rows][["uid", "premise", "hypothesis", "label"]].reset_index(drop=True)
        out["label"] = out["label"].astype("int64")
        out.to_parquet(OUT / f"{split}.parquet", index=False, compression="zstd")
        print(f"{split}: {len(out)} of {len(df)} rows -> {OUT / f'{split}.parquet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
