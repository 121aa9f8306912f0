import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import CLASSES, tiny_config
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.run.rundir import read_table

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, folder_data):
    tmp = tmp_path_factory.mktemp("fit")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{name: all, epochs: 3, lr: 2.0e-2}]"))
    out = tmp / "run"
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_fit_writes_a_complete_run_directory(trained_run):
    for name in [
        "config.yaml",
        "metrics.csv",
        "classes.json",
        "stats.json",
        "log.txt",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ]:
        assert (trained_run / name).is_file(), name
    rows = read_table(trained_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["stage", "epoch", "train_loss", "valid_loss", "accuracy", "lr", "seconds"]
    assert float(rows[-1]["accuracy"]) > 0.6  # the shapes are easy
    assert "seed: 0" in (trained_run / "config.yaml").read_text()


def test_checkpoints_load_with_weights_only(trained_run):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "stage", "epoch", "rng"} <= set(state)
    best = checkpoint.load(trained_run / "checkpoints" / "best.pt")
    assert math.isfinite(best["best_valid_loss"])


def test_predict_writes_probabilities_per_class(trained_run, folder_data, tmp_path):
    out = tmp_path / "pred.csv"
    res = runner.invoke(app, ["predict", str(trained_run), "--data", str(folder_data / "test"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "label", *CLASSES]
    assert len(df) == 4
    assert df[CLASSES].sum(axis=1).round(4).eq(1).all()
    res = runner.invoke(
        app, ["predict", str(trained_run), "--data", str(folder_data / "test"), "--out", str(out), "--labels"]
    )
    assert list(pd.read_csv(out).columns) == ["id", "label"]


def test_same_seed_same_metrics(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{epochs: 1, lr: 1.0e-2}]"))
    for name in ("a", "b"):
        assert runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / name)]).exit_code == 0
    a, b = (read_table(tmp_path / n / "metrics.csv") for n in ("a", "b"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


def test_csv_layout_fit(tmp_path, csv_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        tiny_config(
            csv_data, layout="csv", data_extra=", suffix: .jpg, valid_pct: 0.3", stages="[{epochs: 1, lr: 1.0e-2}]"
        )
    )
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "r"), "--smoke"])
    assert res.exit_code == 0, res.output
    assert "smoke run passed" in res.output


def test_summary_table(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, arch="bnresnet"))
    res = runner.invoke(app, ["summary", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "BnLayer" in res.output and "trainable" in res.output


def test_progress_is_a_table_on_a_terminal_and_plain_lines_otherwise(tmp_path, folder_data, capsys):
    import io

    from rich.console import Console

    from trainer.config import load_config
    from trainer.run import fit as spine

    cfg = load_config(text=tiny_config(folder_data, stages="[{epochs: 2, lr: 1.0e-2}]"))
    buf = io.StringIO()
    spine.fit(cfg, tmp_path / "tty", console=Console(file=buf, force_terminal=True, width=120))
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    rows = [ln for ln in text.splitlines() if re.match(r"^\s+train\s+\d\s", ln)]
    assert len(rows) == 2  # one aligned row per epoch under a single header
    assert text.count("valid_loss") == 1
    capsys.readouterr()
    spine.fit(cfg, tmp_path / "plain", console=Console(file=io.StringIO(), force_terminal=False))
    out = capsys.readouterr().out
    assert out.count("train_loss") == 2 and "\x1b[" not in out


def test_best_pt_is_chosen_among_epochs_at_the_last_image_size(tmp_path, folder_data):
    """Validation losses at 16 px and at 24 px do not compare: when a stage changes the size, the
    best so far starts again, so best.pt is a model of the size the run ends at."""
    from trainer.config import load_config
    from trainer.run import fit as spine
    from trainer.train.loop import Callback

    class BestAtStart(Callback):
        seen: list = []

        def before_fit(self, learn):
            self.seen.append(self.sess.best.value)  # the run's best loss as each stage starts

    real = spine.open_session

    def open_session(*a, **k):
        BestAtStart.sess = real(*a, **k)
        return BestAtStart.sess

    stages = "[{epochs: 2, lr: 1.0e-2, size: 16}, {epochs: 1, lr: 1.0e-3, size: 24}, {epochs: 1, lr: 1.0e-3, size: 24}]"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages=stages))
    spy = BestAtStart()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(spine, "open_session", open_session)
        spine.fit(load_config(cfg), tmp_path / "run", callbacks=[spy])
    assert spy.seen[:2] == [math.inf, math.inf] and math.isfinite(spy.seen[2])  # same size: kept
    rows = read_table(tmp_path / "run" / "metrics.csv")
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["stage"] >= 1
    assert best["best_valid_loss"] == pytest.approx(min(float(r["valid_loss"]) for r in rows[2:]), rel=1e-4)


def test_predict_on_a_folder_per_class_gives_unique_ids(trained_run, folder_data, tmp_path):
    """Files named alike in class folders (test/circle/0.png, test/square/0.png, as CIFAR-10's
    folders are) keep distinct ids: the path below the folder."""
    import shutil

    for cls in CLASSES:
        (tmp_path / "data" / cls).mkdir(parents=True)
        shutil.copy(next((folder_data / "valid" / cls).iterdir()), tmp_path / "data" / cls / "0.png")
    out = tmp_path / "pred.csv"
    res = runner.invoke(app, ["predict", str(trained_run), "--data", str(tmp_path / "data"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(pd.read_csv(out, dtype={"id": str})["id"]) == sorted(f"{c}/0" for c in CLASSES)


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_of(tmp_path, folder_data, capsys, monkeypatch):
    # emulated bf16 took 1.9x to 23x fp32's step time on such CPUs: a user asking for it to go faster should know
    from trainer.config import load_config
    from trainer.run.fit import fit
    from trainer.train.precision import Precision, slow_here

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(tiny_config(folder_data, stages="[{epochs: 1, lr: 1.0e-2}]") + "amp: bf16\n")
    run = fit(load_config(cfg_path), tmp_path / "run").run_dir
    err = capsys.readouterr().err
    assert err.count("warning: amp: bf16 on a CPU without bf16 instructions") == 1
    assert "without bf16 instructions" in (run / "log.txt").read_text()
    assert slow_here(Precision("cpu", None)) is None  # fp32 (amp: auto on the CPU) is never warned of
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert slow_here(Precision("cpu", torch.bfloat16)) is None  # with AMX bf16 is the fast path
