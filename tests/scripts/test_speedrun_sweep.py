"""scripts/speedrun_sweep.py end to end on a tiny config: a row per run, the overrides applied, the
spread over seeds. One invocation of two runs (each a fit and an evaluate subprocess) covers it."""

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import tiny_config
from tests.runs import ROOT, pythonpath
from trainer.run.runtime import cpu_budget


def script(*args: str):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "speedrun_sweep.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath()},
        timeout=300,
    )


def test_a_variant_over_two_seeds_prints_each_run_the_spread_and_applies_its_overrides(tmp_path, folder_data):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(folder_data) + "transforms: {preset: pad_crop}\ntta: {n: 1, mode: flips}\n")
    out, rows_file = tmp_path / "sweep", tmp_path / "rows.json"
    args = [
        "--config",
        str(cfg),
        "--epochs",
        "1",
        "--group",
        "augment",
        "--only",
        "cut",
        "--seeds",
        "3,4",
        "--jobs",
        "2",
    ]
    res = script(
        *args, "--variant", "cut=transforms.cutout=4;train.wd=0.0", "--out", str(out), "--json", str(rows_file)
    )
    assert res.returncode == 0, res.stdout + res.stderr
    runs = [l.split() for l in res.stdout.splitlines() if l.startswith("cut")]
    assert sorted(r[1] for r in runs[:2]) == ["3", "4"] and runs[2][1] == "2", res.stdout  # two runs, then mean/spread
    mean, spread = float(runs[2][2]), float(runs[2][3])
    rows = json.loads(rows_file.read_text())
    accs = [r["accuracy"] for r in rows]
    assert sorted((r["variant"], r["seed"], r["epochs"]) for r in rows) == [("cut", 3, 1), ("cut", 4, 1)]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["accuracy_tta"] <= 1 for r in rows)
    assert abs(mean - sum(accs) / 2) < 1e-4 and abs(spread - abs(accs[0] - accs[1])) < 1e-4
    for seed in (3, 4):
        saved = yaml.safe_load((out / f"cut-seed{seed}" / "config.yaml").read_text())
        assert (saved["seed"], saved["transforms"]["cutout"], saved["train"]["wd"]) == (seed, 4, 0.0)
        threads = max(1, cpu_budget() // 2)  # --jobs 2: the threads shared out
        assert f"({threads} CPU threads)" in (out / f"cut-seed{seed}" / "log.txt").read_text()


def test_an_unknown_variant_is_named_with_the_groups_own(tmp_path):
    res = script("--group", "augment", "--only", "mixup,nosuch", "--out", str(tmp_path / "sweep"))
    assert res.returncode != 0 and "unknown variant(s) ['nosuch']" in res.stderr
    assert "known: baseline, mixup, cutmix, trivialaugment, all" in res.stderr and not (tmp_path / "sweep").exists()
