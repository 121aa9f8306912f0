"""scripts/speedrun_sweep.py end to end on a tiny config: a row per variant, the overrides applied."""

import json
import os
import subprocess
import sys

from tests.conftest import tiny_config
from tests.runs import ROOT, pythonpath


def test_the_sweep_prints_a_row_per_variant_and_applies_its_overrides(tmp_path, folder_data):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(folder_data) + "transforms: {preset: pad_crop}\ntta: {n: 1, mode: flips}\n")
    out = tmp_path / "sweep"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "speedrun_sweep.py"),
            "--config",
            str(cfg),
            "--epochs",
            "1",
            "--only",
            "ema",
            "--variant",
            "cut=transforms.cutout=4;train.wd=0.0",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "rows.json"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath()},
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith(("ema", "cut"))]
    assert len(lines) == 2, res.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["variant"] for r in rows] == ["ema", "cut"]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["accuracy_tta"] <= 1 and r["epochs"] == 1 for r in rows)
    import yaml

    saved = yaml.safe_load((out / "cut" / "config.yaml").read_text())
    assert saved["transforms"]["cutout"] == 4 and saved["train"]["wd"] == 0.0
    assert yaml.safe_load((out / "ema" / "config.yaml").read_text())["train"]["ema"] == 0.99


def test_a_group_over_two_seeds_prints_each_run_and_the_spread(tmp_path, folder_data):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(folder_data) + "transforms: {preset: pad_crop}\n")
    out = tmp_path / "sweep"
    args = ["--config", str(cfg), "--epochs", "1", "--group", "augment", "--only", "mixup", "--seeds", "3,4"]
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "speedrun_sweep.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath()},
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    runs = [l.split() for l in res.stdout.splitlines() if l.startswith("mixup")]
    assert [r[1] for r in runs[:2]] == ["3", "4"] and runs[2][1] == "2", res.stdout  # two runs, then mean/spread
    mean, spread = float(runs[2][2]), float(runs[2][3])
    accs = [float(r[3]) for r in runs[:2]]
    assert abs(mean - sum(accs) / 2) < 1e-4 and abs(spread - abs(accs[0] - accs[1])) < 1e-4
    for seed in (3, 4):
        saved = yaml.safe_load((out / f"mixup-seed{seed}" / "config.yaml").read_text())
        assert saved["seed"] == seed and saved["transforms"]["mixup"] == 0.2
