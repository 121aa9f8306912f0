"""checkpoint: {monitor, keep}: best.pt by the chosen metric, the k best states of the run as
checkpoints/top-<k>.pt with index.json, `--checkpoint top-2`, and the files right after a crash in
the middle of their update."""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from tests.runs import Crash, CrashAt, assert_same_run
from trainer import storage
from trainer.config import load_config
from trainer.inference.finished import load_run
from trainer.run import fit as spine
from trainer.run.topk import TopK, top_name
from trainer.train.loop import Callback

LOSSES = [0.5, 0.3, 0.4, 0.2, 0.6]  # top 2 by valid_loss: epoch 4 (0.2), then epoch 2 (0.3)
ACCURACY = [0.5, 0.7, 0.6, 0.9, 0.4]  # top 2 by accuracy: epoch 4, then epoch 2; best.pt: epoch 4


class Scripted(Callback):
    """The epoch's validation loss and accuracy from the lists above (before anything reads them)."""

    order = -100

    def after_epoch(self, learn):
        learn.state.valid["valid_loss"] = LOSSES[learn.state.epoch]
        learn.state.valid["accuracy"] = ACCURACY[learn.state.epoch]


def config(tmp_path: Path, data: Path, checkpoint: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(data, stages="[{name: all, epochs: 5, lr: 1.0e-2}]") + f"checkpoint: {checkpoint}\n")
    return cfg


@pytest.mark.parametrize("monitor", ["valid_loss", "accuracy"])
def test_the_top_k_after_a_run(tmp_path, folder_data, monitor):
    cfg = config(tmp_path, folder_data, f"{{monitor: {monitor}, keep: 2}}")
    spine.fit(load_config(cfg), tmp_path / "run", callbacks=[Scripted()])
    folder = tmp_path / "run" / "checkpoints"
    index = json.loads((folder / "index.json").read_text())
    assert index["monitor"] == monitor and index["mode"] == ("min" if monitor == "valid_loss" else "max")
    assert [(e["rank"], e["row"], e["file"]) for e in index["top"]] == [(1, 4, "top-1.pt"), (2, 2, "top-2.pt")]
    assert [e["value"] for e in index["top"]] == ([0.2, 0.3] if monitor == "valid_loss" else [0.9, 0.7])
    assert sorted(p.name for p in folder.glob("top-*.pt")) == ["top-1.pt", "top-2.pt"]
    for e in index["top"]:
        assert storage.load(folder / e["file"])["top"]["row"] == e["row"]
    best = storage.load(folder / "best.pt")
    assert best["best_metric"] == {"name": monitor, "value": index["top"][0]["value"]} and best["epoch"] == 4
    # the files hold those epochs' weights: top-2 is not top-1, and predict can load either
    second, first = load_run(tmp_path / "run", "top-2"), load_run(tmp_path / "run", "top-1")
    a, b = (dict(r.built.model.state_dict()) for r in (first, second))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], storage.load(folder / "best.pt")["model"][k]) for k in a)


def test_predict_takes_a_top_k_checkpoint_and_names_what_exists(tmp_path, folder_data):
    from typer.testing import CliRunner

    from trainer.cli import app

    spine.fit(load_config(config(tmp_path, folder_data, "{keep: 2}")), tmp_path / "run", callbacks=[Scripted()])
    runner = CliRunner()
    ok = runner.invoke(
        app, ["predict", str(tmp_path / "run"), "--data", str(folder_data / "test"), "--checkpoint", "top-2"]
    )
    assert ok.exit_code == 0, ok.output
    missing = runner.invoke(
        app, ["predict", str(tmp_path / "run"), "--data", str(folder_data), "--checkpoint", "top-3"]
    )
    assert missing.exit_code == 2 and "top-1, top-2" in missing.output


@pytest.mark.parametrize("crash", [(3, "after_epoch", 99), (4, "after_epoch", 99), (13, "after_batch", 99)])
def test_top_k_resumes_exactly(tmp_path, folder_data, crash):
    cfg = config(tmp_path, folder_data, "{monitor: accuracy, keep: 3}")
    spine.fit(load_config(cfg), tmp_path / "reference", callbacks=[Scripted()])
    with pytest.raises(Crash):
        spine.fit(load_config(cfg), tmp_path / "run", callbacks=[Scripted(), CrashAt(*crash)])
    spine.fit(load_config(cfg), resume=tmp_path / "run", callbacks=[Scripted()])
    assert_same_run(tmp_path / "reference", tmp_path / "run")
    assert same_top_files(tmp_path / "reference" / "checkpoints", tmp_path / "run" / "checkpoints")


def same_top_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("top-*.pt"))
    assert names == sorted(p.name for p in b.glob("top-*.pt"))
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    for n in names:
        x, y = storage.load(a / n), storage.load(b / n)
        assert x["top"] == y["top"] and all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
    return True


def fill(folder: Path, top: TopK, values: list[float]) -> None:
    """Epochs with these values, each a state whose weight is its row (the whole update each time)."""
    for row, v in enumerate(values, len(top.entries) + 1):
        entry = top.entry(v, row)
        if entry is not None:
            top.admit(entry)
            top.write(folder, {"model": {"w": torch.tensor([float(row)])}}, entry)


@pytest.mark.parametrize("renames_done", [0, 1, 2, 3])
def test_a_crash_during_the_shift_is_repaired_on_resume(tmp_path, renames_done):
    """keep 3, values 5 4 3 then 1 (a new best): top-2 -> top-3, top-1 -> top-2, new -> top-1. A
    crash after any of those steps; the resume repairs from the checkpoint's list and redoes the
    epoch: the files end as without the crash."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    fill(ref, TopK(3, "valid_loss", "min"), [5, 4, 3, 1])
    top = TopK(3, "valid_loss", "min")
    fill(run, top, [5, 4, 3])
    saved = top.state_dict()  # what last.pt holds before epoch 4
    # epoch 4's update, cut short after `renames_done` of its steps
    steps = [
        lambda: os.replace(run / top_name(2), run / top_name(3)),
        lambda: os.replace(run / top_name(1), run / top_name(2)),
    ]
    steps.append(lambda: storage.save({"model": {"w": torch.tensor([4.0])}, "top": {"row": 4}}, run / top_name(1)))
    for step in steps[:renames_done]:
        step()
    resumed = TopK(3, "valid_loss", "min")
    resumed.load_state_dict(saved)
    lost = resumed.repair(run)
    assert [e["row"] for e in lost] == ([] if renames_done == 0 else [1])  # the state that fell off anyway
    entry = resumed.entry(1.0, 4)  # the epoch, done again
    resumed.admit(entry)
    resumed.write(run, {"model": {"w": torch.tensor([4.0])}}, entry)
    rows = lambda f: [storage.load(f / top_name(r))["model"]["w"].item() for r in (1, 2, 3)]  # noqa: E731
    assert rows(run) == rows(ref) == [4.0, 3.0, 2.0]
    assert json.loads((run / "index.json").read_text()) == json.loads((ref / "index.json").read_text())
