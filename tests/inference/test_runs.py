"""`trainer runs`: every run directory under a folder with its status (a killed run is interrupted,
a live one running), epochs, best monitored metric and wall time, newest first; corrupt and
half-written runs listed as damaged with the reason, never a traceback."""

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from rich.console import Console

from tests.conftest import tiny_config
from trainer.cli import main
from trainer.config import dump_config, load_config
from trainer.inference.runs import list_runs, read_run, wall
from trainer.run.rundir import METRIC_COLUMNS, write_table
from trainer.run.status import lock


def config_text(data: Path, lr: float = 1e-2, bs: int = 8, seed: int = 0, epochs: int = 3, monitor: str = "") -> str:
    """A run's config.yaml as fit writes it (resolved, every default filled in)."""
    text = tiny_config(data, stages=f"[{{name: all, epochs: {epochs}, lr: {lr}}}]")
    text = text.replace("bs: 8", f"bs: {bs}").replace("seed: 0", f"seed: {seed}")
    if monitor:
        text += f"checkpoint: {{monitor: {monitor}}}\n"
    return dump_config(load_config(text=text))


def metric_rows(valid_loss: list[float], accuracy: list[float] | None = None, seconds: float = 2.0) -> list[dict]:
    accuracy = accuracy or [0.5] * len(valid_loss)
    return [
        {
            "stage": "all",
            "epoch": i + 1,
            "train_loss": v + 0.1,
            "valid_loss": v,
            "accuracy": a,
            "lr": 1e-3,
            "seconds": seconds,
        }
        for i, (v, a) in enumerate(zip(valid_loss, accuracy, strict=True))
    ]


def make_run(folder: Path, config: str | None = None, status: dict | str | None = None, metrics=None) -> Path:
    """A run directory by hand: config.yaml text, status.json (a dict, or raw text), metrics.csv
    (rows, or raw text); None leaves a file out."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.yaml").write_text(config)
    if status is not None:
        (folder / "status.json").write_text(status if isinstance(status, str) else json.dumps(status))
    if isinstance(metrics, str):
        (folder / "metrics.csv").write_text(metrics)
    elif metrics is not None:
        write_table(folder / "metrics.csv", metrics, METRIC_COLUMNS)
    (folder / "log.txt").write_text("10:00:00 run started\n")
    return folder


def finished(day: int, **extra) -> dict:
    return {
        "status": "finished",
        "time": f"2026-01-{day:02d}T11:00:00",
        "started": f"2026-01-{day:02d}T10:00:00",
        **extra,
    }


@pytest.fixture
def zoo(tmp_path) -> Path:
    """A runs folder with a run of every kind, each started on its own day (day 1 oldest)."""
    root, good = tmp_path / "runs", config_text(tmp_path)
    make_run(
        root / "tiny" / "finished",
        good,
        finished(9, seconds=72.4, device="cpu"),
        metric_rows([0.9, 0.412, 0.6]),
    )
    make_run(
        root / "tiny" / "stopped",
        config_text(tmp_path, monitor="accuracy"),
        finished(8, status="stopped", reason="no improvement in accuracy for 2 epochs"),
        metric_rows([0.9, 0.8, 0.7], [0.5, 0.875, 0.75]),
    )
    make_run(root / "tiny" / "killed", good, finished(7, status="running"), metric_rows([0.9]))
    make_run(root / "tiny" / "failed", good, finished(6, status="failed", message="RuntimeError: boom"), [])
    make_run(
        root / "tiny" / "20260105-093000",
        good,
        {"status": "finished", "time": "x"},
        metric_rows([1.0, 0.7], seconds=40),
    )
    make_run(root / "broken" / "no_config", None, finished(4), metric_rows([0.5]))
    make_run(root / "broken" / "bad_yaml", "name: [tiny\n  data: {", finished(3))
    make_run(root / "broken" / "a_list", "- name\n- tiny\n", finished(3))
    make_run(root / "broken" / "bad_status", good, "{not json", metric_rows([0.5]))
    make_run(root / "broken" / "ragged", good, finished(2), "stage,epoch,valid_loss\nall,1,0.5\nall,2\n")
    make_run(root / "broken" / "garbage", good, finished(2), "stage,epoch,valid_loss\nall,1,zzz\n")
    make_run(root / "broken" / "only_log")
    make_run(root / "tiny" / "finished" / "checkpoints", good, finished(1))  # inside a run: not a run of its own
    lr_find = make_run(root / "tiny" / "lr_find-1", good)
    (lr_find / "lr_find.json").write_text("{}")  # trainer lr-find's folder: trains nothing
    return root


def by_folder(root: Path) -> dict:
    return {r.path.name: r for r in list_runs(root)}


def test_every_run_is_listed_once_with_its_status(zoo):
    runs = by_folder(zoo)
    assert sorted(runs) == sorted(
        [
            "finished",
            "stopped",
            "killed",
            "failed",
            "20260105-093000",
            "no_config",
            "bad_yaml",
            "a_list",
            "bad_status",
            "ragged",
            "garbage",
            "only_log",
        ]
    )
    assert runs["finished"].status == "finished" and runs["finished"].reason is None
    assert runs["stopped"].status == "stopped" and "no improvement" in runs["stopped"].reason
    assert runs["killed"].status == "interrupted"  # said running, but no process holds its lock
    assert runs["failed"].status == "failed" and runs["failed"].reason == "RuntimeError: boom"
    assert runs["20260105-093000"].status == "finished"
    damaged = {name: r.reason for name, r in runs.items() if r.status == "damaged"}
    assert set(damaged) == {"no_config", "bad_yaml", "a_list", "bad_status", "ragged", "garbage", "only_log"}
    assert damaged["no_config"] == "config.yaml: missing"
    assert damaged["bad_status"] == "status.json: not valid JSON"
    assert damaged["ragged"] == "metrics.csv: line 3 has 2 fields, the header 3"
    assert damaged["garbage"] == "metrics.csv: line 2: valid_loss is 'zzz', not a number"
    assert damaged["bad_yaml"] == "config.yaml: not valid YAML"
    assert damaged["a_list"] == "config.yaml: not a mapping of keys (a list)"
    assert damaged["only_log"].startswith("config.yaml: missing")


def test_newest_first_with_old_runs_dated_by_their_folder_name(zoo):
    names = [r.path.name for r in list_runs(zoo)]
    dated = ["finished", "stopped", "killed", "failed", "20260105-093000", "no_config", "a_list", "bad_yaml"]
    assert [n for n in names if n in dated] == dated
    assert set(names[:2]) == {"bad_status", "only_log"}  # no start time of their own: their files' time, today
    old = read_run(zoo / "tiny" / "20260105-093000")  # status.json of an old run: status and time only
    assert old.started.isoformat() == "2026-01-05T09:30:00"
    assert old.seconds == 80.0  # the sum of metrics.csv's seconds


def test_what_can_still_be_read_of_a_damaged_run_is_shown(zoo):
    runs = by_folder(zoo)
    assert runs["no_config"].epochs_done == 1 and runs["no_config"].best == 0.5  # metrics, monitor valid_loss
    assert runs["bad_status"].name == "tiny" and runs["bad_status"].epochs_planned == 3
    assert runs["ragged"].epochs_done is None and runs["ragged"].started.day == 2
    assert runs["bad_yaml"].name is None and runs["only_log"].started is not None  # the folder's file time


def test_epochs_and_the_best_of_the_monitored_metric_min_or_max(zoo):
    runs = by_folder(zoo)
    done = runs["finished"]
    assert (done.epochs_done, done.epochs_planned, done.monitor, done.best) == (3, 3, "valid_loss", 0.412)
    assert (done.seconds, done.device) == (72.4, "cpu")
    stopped = runs["stopped"]  # monitor accuracy: the highest, though not the last
    assert (stopped.monitor, stopped.best, stopped.epochs_done) == ("accuracy", 0.875, 3)
    assert runs["failed"].epochs_done == 0 and runs["failed"].best is None


def test_a_running_run_holds_its_lock_and_turns_interrupted_when_it_is_free(tmp_path):
    status = finished(1, status="running", seconds=0.0)  # written at the start: its seconds are stale
    run = make_run(tmp_path / "live", config_text(tmp_path), status, metric_rows([0.5, 0.4], seconds=30))
    held = lock(run)
    try:
        assert read_run(run).status == "running"
    finally:
        held.close()
    info = read_run(run)
    assert (info.status, info.reason, info.seconds) == ("interrupted", "killed", 60.0)


def test_device_and_start_of_an_old_run_come_from_its_log(tmp_path):
    run = make_run(tmp_path / "out", config_text(tmp_path), {"status": "finished"}, metric_rows([0.5]))
    (run / "log.txt").write_text(
        "09:15:00 run out: seed 0, device cuda:0 (8 CPU threads), amp bf16, 1,000 parameters\n"
        "09:20:00 run out: seed 0, device cpu (8 CPU threads), amp fp32, 1,000 parameters\n"
    )
    info = read_run(run)
    assert info.device == "cpu"  # the last session's
    assert info.started.strftime("%H:%M:%S") == "09:15:00"


@pytest.mark.parametrize(
    "files_at, first_line, started",
    [
        ("2026-12-02 06:04:10", "06:04:12", "2026-12-02 06:04:12"),  # the log's first line after config.yaml
        ("2026-12-02 00:10:00", "23:50:00", "2026-12-01 23:50:00"),  # started before midnight
    ],
)
def test_the_start_of_a_run_without_status_takes_its_date_from_its_files(tmp_path, files_at, first_line, started):
    run = tmp_path / "out"
    run.mkdir()
    (run / "config.yaml").write_text(config_text(tmp_path))
    (run / "log.txt").write_text(f"{first_line} run out: seed 0, device cpu (2 CPU threads), amp fp32, 1 parameters\n")
    stamp = datetime.strptime(files_at, "%Y-%m-%d %H:%M:%S").timestamp()
    for f in run.iterdir():
        os.utime(f, (stamp, stamp + 2 * (f.name == "log.txt")))
    assert read_run(run).started == datetime.strptime(started, "%Y-%m-%d %H:%M:%S")


def test_wall_time_reads_at_a_glance():
    assert [wall(5), wall(72.4), wall(7385), wall(None)] == ["5s", "1m12s", "2h03m", "-"]


def cli(monkeypatch, capsys, *argv):
    monkeypatch.setattr("sys.argv", ["trainer", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_json_lists_every_run_with_every_field(zoo, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "runs", str(zoo), "--json")
    assert code == 0 and err == ""
    listed = json.loads(out)
    assert len(listed) == 12
    fields = {"name", "started", "status", "reason", "epochs_done", "epochs_planned", "monitor", "best"}
    assert all(fields | {"seconds", "device", "path"} == set(r) for r in listed)
    assert [r["path"] for r in listed].index(str(zoo / "tiny" / "finished")) == 2  # after the two dated today
    first = listed[2]
    assert first["started"] == "2026-01-09T10:00:00" and first["status"] == "finished" and first["name"] == "tiny"
    assert (first["best"], first["seconds"], first["epochs_done"]) == (0.412, 72.4, 3)
    assert sum(r["status"] == "damaged" for r in listed) == 7


def test_the_table_shows_each_run(zoo, monkeypatch, capsys):
    monkeypatch.setattr("trainer.cli.common.console", Console(width=300))  # no wrapping inside the cells
    code, out, err = cli(monkeypatch, capsys, "runs", str(zoo))
    assert code == 0 and err == ""
    lines = {line.split("│")[-2].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert len(lines) == 12
    finished = lines[str(zoo / "tiny" / "finished")]
    for cell in ("tiny", "2026-01-09 10:00", "finished", "3/3", "valid_loss 0.412", "1m12s", "cpu"):
        assert f"│ {cell} " in finished
    assert "│ stopped (no improvement in accuracy for 2 epochs) " in lines[str(zoo / "tiny" / "stopped")]
    assert "accuracy 0.875" in lines[str(zoo / "tiny" / "stopped")]
    assert "│ interrupted (killed) " in lines[str(zoo / "tiny" / "killed")]
    assert "│ damaged (config.yaml: not valid YAML) " in lines[str(zoo / "broken" / "bad_yaml")]
    assert "Traceback" not in out


def test_no_runs_and_no_folder(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "runs", str(tmp_path))
    assert code == 0 and "no runs found under" in out
    for missing in (tmp_path / "nowhere", make_run(tmp_path / "r") / "log.txt"):
        code, out, err = cli(monkeypatch, capsys, "runs", str(missing))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "error:" in err
