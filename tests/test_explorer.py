"""The explorer page (results/comparison/explorer.html): its data, that it is self-contained, and
that it works in a real headless browser (Debian's Chromium; .ci/run installs it).

The browser test opens the page with ``#selftest&uncheck=method:lora``: the page's own hook
(peftbench.analysis.explorer) writes its checks as JSON into ``<pre id="selftest">``, which
``--dump-dom`` returns; console errors are also read from Chromium's stderr
(``--enable-logging=stderr``).
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peftbench.analysis.explorer import X_AXES, payload, render_page, write_explorer, x_axes, y_axes
from peftbench.analysis.significance import StatsOptions, compare_methods
from peftbench.cli import main
from peftbench.vocab import PROVENANCE

METRIC = {"cola": "matthews_correlation", "rte": "accuracy"}
FAILED = ("rte", "lora", 0.5, 2)      # (task, method, budget, seed) of the failed run
MISSING = ("cola", "adalora", 0.2, 1)  # ... and of the missing one


def make_runs() -> pd.DataFrame:
    """2 tasks x (lora, adalora at budgets 0.2 and 0.5; full once) x 3 seeds, one failed and
    one missing run, with the provenance columns."""
    rows = []
    base = {"cola": 0.50, "rte": 0.70}
    for task in ("cola", "rte"):
        for method, budgets in (("full", (100.0,)), ("lora", (0.2, 0.5)), ("adalora", (0.2, 0.5))):
            for b in budgets:
                for seed in (0, 1, 2):
                    status = ("failed" if (task, method, b, seed) == FAILED else
                              "missing" if (task, method, b, seed) == MISSING else "ok")
                    full = method == "full"
                    v = (base[task] + {"full": 0.02, "lora": 0.0, "adalora": 0.1}[method] + 0.004 * seed
                         + (0.0 if full else 0.01 * b)
                         + (0.003 * (seed % 2) if method == "adalora" else 0.0))  # differences vary by seed
                    row = dict(model="m", task=task, method=method, budget=b, seed=seed, status=status,
                               error="loss became nan at step 3" if status == "failed" else None,
                               metric=METRIC[task], dev_main=v if status == "ok" else np.nan,
                               best_dev_main=v + 0.01 if status == "ok" else np.nan,
                               **{f"dev_{METRIC[task]}": v if status == "ok" else np.nan},
                               trainable_params=22_700_000 if full else int(b * 227_000) + 770,
                               adapter_params=22_700_000 if full else int(b * 227_000),
                               trainable_pct=100.0 if full else b, train_s=200.0 if full else 100.0 + seed,
                               peak_mem_mib=3000.0 if full else 1500.0 + 100 * b,
                               **{c: f"{c}-value" for c in PROVENANCE})
                    if status == "missing":
                        row = {k: row[k] for k in ("model", "task", "method", "budget", "seed", "status")}
                    rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    runs = make_runs()
    sig = compare_methods(runs, reference="lora", opts=StatsOptions(resamples=200, seed=0))
    d = tmp_path_factory.mktemp("explorer-tables")
    runs.to_parquet(d / "runs.parquet", index=False)
    sig.to_parquet(d / "significance.parquet", index=False)
    return d, runs, sig


# ------------------------------------------------------------------------------------------------
# The data on the page
# ------------------------------------------------------------------------------------------------

def test_axes_offer_the_columns_present(tables):
    _, runs, _ = tables
    assert [a.column for a in x_axes(runs)] == ["trainable_params", "adapter_params", "trainable_pct", "train_s",
                                                "peak_mem_mib"]
    assert "tuning_s" in [a.column for a in X_AXES]
    assert [a.column for a in x_axes(runs.assign(tuning_s=12.5))][-1] == "tuning_s"
    assert "tuning_s" not in [a.column for a in x_axes(runs.assign(tuning_s=np.nan))]
    ys = y_axes(runs.assign(ood_hans_accuracy=0.55, dev_f1=np.nan))
    assert [a.column for a in ys] == ["dev_main", "best_dev_main", "dev_matthews_correlation", "dev_accuracy",
                                      "ood_hans_accuracy"]  # dev_f1: no finite value
    by = {a.column: a for a in ys}
    assert by["dev_main"].scale == 100 and by["dev_main"].label == "main metric of the task, final epoch ×100"
    assert by["best_dev_main"].short == "main (best) ×100"
    assert by["dev_matthews_correlation"].label == "Matthews corr., final epoch ×100"
    assert by["ood_hans_accuracy"].label == "hans_accuracy, OOD ×100"


def test_payload_runs_families_and_significance(tables):
    _, runs, sig = tables
    d = payload(runs, sig)
    assert d["reference"] == "lora" and d["defaults"] == {"x": "trainable_params", "y": "dev_main"}
    assert d["order"]["method"] == ["full", "lora", "adalora"] and d["order"]["budget"] == ["0.2", "0.5"]
    assert d["labels"]["method"]["adalora"] == "AdaLoRA" and d["labels"]["task"]["cola"] == "CoLA"
    assert d["provenance"] == list(PROVENANCE)
    full = [r for r in d["runs"] if r["method"] == "full"]
    assert len(full) == 2 * 3 * 2  # every full run once per budget it is compared in
    assert {r["run_budget"] for r in full} == {"100"} and {r["budget"] for r in full} == {"0.2", "0.5"}
    assert {r["id"] for r in full} == {f"m/{t}/full/b100/s{s}" for t in ("cola", "rte") for s in (0, 1, 2)}
    failed = [r for r in d["runs"] if r["status"] == "failed"]
    assert [(r["id"], r["dev_main"], r["error"]) for r in failed] == [("m/rte/lora/b0.5/s2", None,
                                                                       "loss became nan at step 3")]
    missing = [r for r in d["runs"] if r["status"] == "missing"]
    assert [r["id"] for r in missing] == ["m/cola/adalora/b0.2/s1"] and missing[0]["git_commit"] is None
    rows = {(s["task"], s["budget"], s["method"]): s for s in d["significance"]}
    assert set(rows) == {(t, b, m) for t in ("cola", "rte") for b in ("0.2", "0.5") for m in ("full", "adalora")}
    ada = rows[("rte", "0.2", "adalora")]
    ref = sig[(sig.task == "rte") & (sig.budget == "0.2") & (sig.method == "adalora") & (sig.baseline == "lora")].iloc[0]
    assert ada["diff"] == pytest.approx(ref["mean_diff"]) and ada["p"] == pytest.approx(ref["p_ttest_holm"])
    p = ref["p_ttest_holm"]
    assert 0 < p < 0.05 and ada["stars"] == ("***" if p < 0.001 else "**" if p < 0.01 else "*")
    assert ada["column"] == "dev_main"
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN


def test_payload_without_a_metric_is_an_error():
    runs = make_runs()
    runs["status"] = "failed"
    with pytest.raises(ValueError, match="no metric column"):
        payload(runs.drop(columns=["dev_matthews_correlation", "dev_accuracy"]).assign(dev_main=np.nan,
                                                                                      best_dev_main=np.nan))


def test_page_is_self_contained(tables, tmp_path):
    _, runs, sig = tables
    runs = runs.copy()
    runs.loc[runs["status"] == "failed", "error"] = "bad </script><script>alert(1)</script> value"
    d = payload(runs, sig)
    page = render_page(d, plotly_js="window.Plotly = {version: 'stub'};")
    assert page.count("<script") == 4 and page.count("</script>") == 4  # errors, plotly, data, app
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    blob = re.search(r'<script type="application/json" id="payload">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob) == d
    out = write_explorer(runs, sig, tmp_path / "x" / "explorer.html")
    text = out.read_text(encoding="utf-8")
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs()[:2000] in text  # plotly.js inlined, not fetched
    assert "cdn.plot.ly/plotly" not in text.split("<body>")[1]


def test_cli_writes_page_and_names_missing_input(tables, tmp_path, caplog):
    d, runs, _ = tables
    out = tmp_path / "comparison" / "explorer.html"
    main(["explorer", "--runs", str(d / "runs.parquet"), "--significance", str(d / "significance.parquet"),
          "--out", str(out)])
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(SystemExit) as exc:
        main(["explorer", "--runs", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "e.html")])
    assert exc.value.code == 1
    assert "nope.parquet: no such file" in caplog.text and "snakemake results/tables/runs.parquet" in caplog.text
    assert not (tmp_path / "e.html").exists()


# ------------------------------------------------------------------------------------------------
# In a real browser
# ------------------------------------------------------------------------------------------------

def chromium() -> str:
    """The Chromium executable; skip (fail under CI) when there is none."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    msg = ("no Chromium found (tried $CHROMIUM, chromium, chromium-browser, google-chrome); install Debian's "
           "package as root: apt-get install -y chromium (.ci/run does)")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def headless(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_page_in_headless_chromium(tables, tmp_path):
    exe = chromium()
    d, runs, sig = tables
    page = write_explorer(runs, sig, tmp_path / "explorer.html")
    url = page.resolve().as_uri()
    proc = headless(exe, tmp_path / "profile", "--dump-dom", url + "#selftest&uncheck=method:lora")
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not [c for c in console if re.search(r"Uncaught|Error|error", c)], "\n".join(console)
    m = re.search(r'<pre id="selftest"[^>]*data-done="1"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the page's self-test did not finish (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(html.unescape(m.group(1)))
    assert res["errors"] == [], res["errors"]
    # one trace per method; one point per (task, method, budget) with a finished run, full once per task
    assert res["methods"] == 3 and res["method_traces"] == 3
    assert res["points"] == 2 * (2 + 2 + 1) and res["front_traces"] == 2
    # table: one row per (task, budget, method); unchecking LoRA removes its 4 rows and its trace
    assert res["unchecked"] == "method:lora"
    assert (res["rows_before"], res["rows_after"], res["method_traces_after"]) == (12, 8, 2)
    assert res["sorted_desc"] is True and res["csv_lines"] == 8 + 1

    shot = tmp_path / "explorer.png"
    proc = headless(exe, tmp_path / "profile", "--hide-scrollbars", "--window-size=1400,1300",
                    f"--screenshot={shot}", url)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-3000:]
    print(f"explorer screenshot: {shot}")


def test_ood_accuracies_become_y_axes():
    """tables/ood.parquet (one row per run and OOD set) joins the runs as ood_<set>_accuracy."""
    from peftbench.analysis.explorer import payload, with_ood_columns
    from peftbench.analysis.significance import validate_runs

    runs = validate_runs(make_runs())
    ok = runs[(runs.status == "ok") & (runs.task == "rte")]
    ood = pd.DataFrame([{**{k: r[k] for k in ("model", "task", "method", "budget", "seed")}, "ood_set": s,
                         "accuracy": 0.4 + 0.01 * i + (0.05 if s == "anli_r2" else 0.0)}
                        for i, (_, r) in enumerate(ok.iterrows()) for s in ("anli_r1", "anli_r2")])
    wide = with_ood_columns(runs, ood)
    assert len(wide) == len(runs)
    rte = wide[(wide.status == "ok") & (wide.task == "rte")].reset_index(drop=True)
    np.testing.assert_allclose(rte["ood_anli_r1_accuracy"], 0.4 + 0.01 * np.arange(len(rte)))
    assert wide.loc[wide.task == "cola", "ood_anli_r1_accuracy"].isna().all()
    d = payload(wide)
    ys = [a["column"] for a in d["y_axes"]]
    assert ys[-2:] == ["ood_anli_r1_accuracy", "ood_anli_r2_accuracy"]
    assert with_ood_columns(runs, None) is runs
    with pytest.raises(ValueError, match="missing column"):
        with_ood_columns(runs, ood.drop(columns=["accuracy"]))
