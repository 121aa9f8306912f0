"""trainer sweep: trials are ordinary runs; the pruner stops a trial whose param ruins training;
two processes share one SQLite study; a killed or interrupted sweep continues; a failed trial is
recorded and the sweep goes on; a bad space file fails before any trial; PostgreSQL for a team."""

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tests.runs import ROOT, free_port
from trainer.cli import app

optuna = pytest.importorskip("optuna", reason="the sweep extra (pip install -e '.[sweep]') is not installed")

runner = CliRunner()
CONFIG = """name: tiny
seed: 0
data: {{layout: folder, path: '{data}', bs: 12}}
model: {{arch: bnresnet, layers: [8, 16]}}
train:
  stages: [{{name: all, epochs: {epochs}, lr: 1.0e-2}}]
"""


def files(tmp_path: Path, data: Path, space: str, epochs: int = 3) -> tuple[Path, Path]:
    cfg, sp = tmp_path / "c.yaml", tmp_path / "space.yaml"
    cfg.write_text(CONFIG.format(data=data, epochs=epochs))
    sp.write_text(space)
    return cfg, sp


def trials(out: Path, name: str = "tiny") -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweep.db'}").trials


def sweep(*args: str):
    return runner.invoke(app, ["sweep", *map(str, args)])


RUINS = """objective: {monitor: valid_loss}
sampler: {name: grid, seed: 1}   # the order: two good lrs first, then a ruinous one
pruner: {name: median, warmup_epochs: 1, startup_trials: 2}
params:
  train.stages.0.lr: {choice: [1.0e-2, 1.0e-7]}   # 1e-7 learns nothing: its trials are pruned
  train.wd: {choice: [0.0, 0.01, 0.1]}
"""


def test_six_trials_the_pruner_stops_the_ruined_ones(tmp_path, folder_data, monkeypatch):
    cfg, space = files(tmp_path, folder_data, RUINS, epochs=2)
    res = sweep(cfg, "--space", space, "--trials", 6, "--out", tmp_path / "sw")
    assert res.exit_code == 0, res.output
    done = trials(tmp_path / "sw")
    states = {t.number: t.state.name for t in done}
    assert len(done) == 6 and "PRUNED" in states.values(), states
    for t in done:
        run = Path(t.user_attrs["run_dir"])
        assert run == tmp_path / "sw" / "trials" / str(t.number) and (run / "metrics.csv").is_file()
        if t.state.name == "PRUNED":  # only the ruinous lr is pruned; its run says why
            assert t.params["train.stages.0.lr"] == 1e-7
            assert len(t.intermediate_values) == 1  # never after the last epoch: that one is a finished trial
            assert json.loads((run / "status.json").read_text())["status"] == "stopped"
        if t.state.name == "COMPLETE":  # the value is the best valid_loss of its epochs
            rows = [float(line.split(",")[3]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
            assert t.value == pytest.approx(min(rows), rel=1e-5) and len(t.intermediate_values) == 2
    table = (tmp_path / "sw" / "trials.csv").read_text().splitlines()
    assert table[0].startswith("number,state,value,seconds,params.train.stages.0.lr,params.train.wd")
    assert len(table) == 7
    best = (tmp_path / "sw" / "best.yaml").read_text()
    winner = min((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"trial {winner.number}" in best and "lr: 0.01" in best
    assert (tmp_path / "sw" / "history.png").is_file() and (tmp_path / "sw" / "importances.png").is_file()
    from trainer.cli import common

    monkeypatch.delenv("COLUMNS", raising=False)  # pytest-xdist sets it
    monkeypatch.setattr(common, "console", common.results_console())
    report = runner.invoke(app, ["sweep-report", str(tmp_path / "sw")])
    assert report.exit_code == 0 and "pruned" in report.output and "complete" in report.output, report.output
    assert "…" not in report.output  # piped, the table keeps every column whole
    # the same command again: the study already holds 6 trials, nothing runs
    again = sweep(cfg, "--space", space, "--trials", 6, "--out", tmp_path / "sw")
    assert again.exit_code == 0 and "nothing to run" in again.output and len(trials(tmp_path / "sw")) == 6
    shutil.move(tmp_path / "sw", tmp_path / "moved")  # sweep.json names the old path of its sweep.db
    report = runner.invoke(app, ["sweep-report", str(tmp_path / "moved")])
    assert report.exit_code == 0 and "complete" in report.output and "pruned" in report.output, report.output
    assert str(tmp_path / "moved" / "trials") in report.output and str(tmp_path / "sw") not in report.output


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, folder_data):
    space = """sampler: {name: grid}
params:
  train.accumulate: {choice: [1, 5]}   # 12 does not split into 5: that trial fails when it starts
  train.stages.0.lr: {choice: [1.0e-2, 1.0e+12]}   # this lr sends the loss to infinity
"""
    cfg, sp = files(tmp_path, folder_data, space, epochs=1)
    res = sweep(cfg, "--space", sp, "--trials", 4, "--out", tmp_path / "sw")
    assert res.exit_code == 0, res.output
    done = {(t.params["train.accumulate"], t.params["train.stages.0.lr"]): t for t in trials(tmp_path / "sw")}
    assert done[(1, 1e-2)].state.name == "COMPLETE"
    assert done[(1, 1e12)].state.name == "FAIL" and "not finite" in done[(1, 1e12)].user_attrs["error"]
    assert done[(5, 1e-2)].state.name == "FAIL" and "accumulate" in done[(5, 1e-2)].user_attrs["error"]
    assert "trial" in res.output and "fail" in res.output


@pytest.mark.parametrize(
    "space,said",
    [
        (
            "params:\n  train.stages.0.lrr: {log: [1.0e-3, 1.0e-1]}\n",
            "space.yaml:2: params.train.stages.0.lrr: unknown key 'lrr' in train.stages.0; did you mean 'lr'?",
        ),
        (
            "params:\n  data.bs: {choice: [8, 0]}\n",
            "space.yaml:2: params.data.bs: the value 0 makes the config invalid",
        ),
        (
            "params:\n  train.wd: {range: [0.1, 0.0]}\n",
            "space.yaml:2: params.train.wd: the low end 0.1 is above the high end",
        ),
        (
            "params:\n  train.wd: {log: [-1.0e-4, 0.1]}\n",
            "space.yaml:2: params.train.wd: log's low end: input should be greater",
        ),
        (
            "params:\n  data.bs: {choice: []}\n",
            "space.yaml:2: params.data.bs: choice: list should have at least 1 item",
        ),
        ("params:\n  train.wd: {range: [0.0, 0.1], log: [1, 2]}\n", "params.train.wd: log takes no key 'range'"),
        ("params:\n  data.bs: {range: [4, 8]}\n", "the value 5.48 makes the config invalid"),
        ("param:\n  train.wd: {range: [0.0, 0.1]}\n", "space.yaml:1: param: unknown key; did you mean 'params'?"),
        ("params:\n  train.wd: {rang: [0.0, 0.1]}\n", "space.yaml:2: params.train.wd: expected {log: [low, high]}"),
        ("params:\n  data.bs: {choices: [8, 16]}\n", "or {choice: [a, b, ...]}; did you mean 'choice'?"),
        (
            "params:\n  train.stages.3.lr: {log: [1.0e-3, 1.0e-1]}\n",
            "train.stages has 1 item(s); '3' is not one of them",
        ),
        ("sampler: {name: grid}\nparams:\n  train.wd: {range: [0.0, 0.1]}\n", "sampler grid takes choice params only"),
        (
            "sampler: {name: random, startup_trials: 2}\nparams:\n  train.wd: {range: [0.0, 0.1]}\n",
            "space.yaml:1: sampler: startup_trials is TPE's (name: tpe); with name: random it does nothing",
        ),
        (
            "params:\n  train.wd: {range: [0.0, 0.1]}\nenqueue:\n  - {train.wd: 0.5}\n",
            "space.yaml:4: enqueue.0: train.wd: 0.5 is outside [0.0, 0.1]",
        ),
        (
            "params:\n  train.wd: {range: [0.0, 0.1]}\nenqueue:\n  - {train.wd: 0.05}\n  - {train.wdd: 0.05}\n",
            "space.yaml:5: enqueue.1: 'train.wdd' is not a param of the space; did you mean 'train.wd'?",
        ),
        (
            "params:\n  data.bs: {choice: [8, 12]}\nenqueue:\n  - {data.bs: 10}\n",
            "space.yaml:4: enqueue.0: data.bs: 10 is not one of its choices [8, 12]",
        ),
        (
            "params:\n  data.bs: {int: [4, 12]}\nenqueue:\n  - {data.bs: 6.5}\n  - {data.bs: 8.0}\n  - {data.bs: .nan}\n",
            "space.yaml:6: enqueue.2: data.bs: .nan is not a whole number",  # 6.5 too, 8.0 passes
        ),
        (
            "params:\n  train.wd: {range: [0.0, 0.1], step: 0.02}\nenqueue:\n  - {train.wd: 0.04}\n  - {train.wd: 0.03}\n",
            "space.yaml:5: enqueue.1: train.wd: 0.03 is not on its grid: 0.0 plus a whole number of steps of 0.02",
        ),
        (
            "params:\n  data.bs: {choice: [8, 12]}\nenqueue:\n  - {data.bs: true}\n",
            "space.yaml:4: enqueue.0: data.bs: true is not one of its choices [8, 12]",
        ),
        (
            "sampler: {name: grid}\nparams:\n  data.bs: {choice: [8, 12]}\nenqueue:\n  - {data.bs: 8}\n",
            "space.yaml:4: enqueue: sampler grid tries every point of its grid already",
        ),
        ("~: 3\nparams:\n  train.wd: {range: [0.0, 0.1]}\n", "space.yaml:1: ~: a key must be a name"),
        (
            "params:\n  train.wd: {range: [0.0, 0.1]}\nenqueue:\n  - {train.wd: 0.05}\n  - {}\n",
            "space.yaml:5: enqueue.1: names no param of the space",
        ),
        (
            "params:\n  train.wd: {range: [0.0, 0.1]}\nenqueue:\n  - {train.wd: 0.05}\n  - {train.wd: 0.05}\n",
            "space.yaml:5: enqueue.1: is the same point as enqueue.0",
        ),
        (  # the hint's last part is close too: not train.stages.0.lr for sharing "train."
            "params:\n  train.stages.0.lr: {log: [1.0e-3, 1.0e-1]}\n  train.stages.0.pct_start: {range: [0.2, 0.4]}\n"
            "enqueue:\n  - {train.pct_start: 0.3}\n",
            "space.yaml:5: enqueue.0: 'train.pct_start' is not a param of the space; "
            "did you mean 'train.stages.0.pct_start'?",
        ),
    ],
)
def test_a_bad_space_file_fails_before_any_trial(tmp_path, folder_data, space, said):
    cfg, sp = files(tmp_path, folder_data, space)
    res = sweep(cfg, "--space", sp, "--trials", 2, "--out", tmp_path / "sw")
    assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    "storage,said",
    [
        ("garbage", "--storage garbage: cannot open it: Could not parse"),
        ("sqlite:////nonexistent/dir/x.db", "--storage sqlite:////nonexistent/dir/x.db: cannot open it"),
        ("sqlite:///{tmp}/notes.txt", "notes.txt: cannot open it: {tmp}/notes.txt is not a SQLite database"),
        ("sqlite:///{tmp}/app.db", "app.db holds another program's tables (orders); Optuna would add its own to them"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line_and_leaves_nothing(tmp_path, folder_data, storage, said):
    (tmp_path / "notes.txt").write_text("the user's notes, not a database\n" * 100)
    with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as db:  # the user's own application's data
        db.execute("create table orders (id integer)")
    before = (tmp_path / "app.db").read_bytes()
    cfg, sp = files(tmp_path, folder_data, SMALL, epochs=1)
    url = storage.format(tmp=tmp_path)
    res = sweep(cfg, "--space", sp, "--trials", 1, "--out", tmp_path / "sw", "--storage", url)
    assert res.exit_code == 2 and said.format(tmp=tmp_path) in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()  # a corrected command starts clean
    assert (tmp_path / "app.db").read_bytes() == before
    assert (tmp_path / "notes.txt").read_text().startswith("the user's notes")


def test_study_names_and_folders_are_checked(tmp_path, folder_data, monkeypatch):
    cfg, sp = files(tmp_path, folder_data, SMALL, epochs=1)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the default --out is sweeps/<study>, under the working folder
    res = sweep(cfg, "--space", sp, "--trials", 1, "--study", "../escape")
    assert res.exit_code == 2 and "--study '../escape'" in res.output and not (tmp_path / "cwd" / "escape").exists()
    assert sweep(cfg, "--space", sp, "--trials", 1, "--out", tmp_path / "sw").exit_code == 0
    other = sweep(cfg, "--space", sp, "--trials", 1, "--out", tmp_path / "sw", "--study", "other")
    assert other.exit_code == 2 and "holds the study 'tiny'" in other.output, other.output
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["study"] == "tiny"
    report = runner.invoke(app, ["sweep-report", str(tmp_path / "sw"), "--study", "nosuch"])
    assert report.exit_code == 2 and "no study 'nosuch'" in report.output and "tiny" in report.output
    assert "Traceback" not in report.output, report.output
    url = f"sqlite:///{tmp_path / 'sw' / 'sweep.db'}"  # another machine: the URL alone, no folder
    alone = runner.invoke(app, ["sweep-report", "--storage", url])
    assert alone.exit_code == 0 and "study 'tiny': 1 complete" in alone.output, alone.output
    import optuna

    optuna.create_study(storage=url, study_name="second")
    two = runner.invoke(app, ["sweep-report", "--storage", url])
    assert two.exit_code == 2 and "holds 2 studies; name one with --study" in two.output, two.output
    empty = runner.invoke(app, ["sweep-report", "--storage", url, "--study", "second"])
    assert empty.exit_code == 0 and "study 'second': no trials yet" in empty.output, empty.output
    assert runner.invoke(app, ["sweep-report", "--storage", url, "--study", "tiny"]).exit_code == 0
    typo = runner.invoke(app, ["sweep-report", "--storage", f"sqlite:///{tmp_path / 'typo.db'}"])
    assert typo.exit_code == 2 and "no sweep database there" in typo.output and not (tmp_path / "typo.db").exists()
    import sqlite3

    with sqlite3.connect(tmp_path / "mine.db") as db:  # a user's own database: read, never given Optuna's tables
        db.execute("create table notes(x)")
    before = (tmp_path / "mine.db").read_bytes()
    mine = runner.invoke(app, ["sweep-report", "--storage", f"sqlite:///{tmp_path / 'mine.db'}"])
    assert mine.exit_code == 2 and "no sweep database there" in mine.output
    assert (tmp_path / "mine.db").read_bytes() == before
    odd = sweep(cfg, "--space", sp, "--trials", 1, "--study", "a\x1b[31mred")
    assert odd.exit_code == 2 and "must be a plain word" in odd.output


def test_a_sweep_whose_every_trial_fails_exits_1(tmp_path, folder_data):
    space = "sampler: {name: grid}\nparams:\n  train.accumulate: {choice: [5, 7]}\n"  # 12 splits into neither
    cfg, sp = files(tmp_path, folder_data, space, epochs=1)
    res = sweep(cfg, "--space", sp, "--trials", 2, "--out", tmp_path / "sw")
    assert res.exit_code == 1 and "every trial failed" in res.output and "accumulate" in res.output, res.output


def start(args: list, cwd: Path, log: Path, step_seconds: float = 0.0) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "slow_steps")]),
        "TRAINER_TEST_STEP_SECONDS": str(step_seconds),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "sweep", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_a_worker_started_while_another_opens_the_study_joins_it(tmp_path, folder_data):
    # the first worker holds the lock and has made sweep.db, but not yet written sweep.json
    cfg, sp = files(tmp_path, folder_data, SMALL, epochs=1)
    out = tmp_path / "sw"
    out.mkdir()
    (out / ".sweep.lock").touch()  # where an earlier version kept its lock
    optuna.create_study(storage=f"sqlite:///{out / 'sweep.db'}", study_name="tiny")
    res = sweep(cfg, "--space", sp, "--trials", 1, "--out", out)
    assert res.exit_code == 0, res.output
    assert [t.state.name for t in trials(out)] == ["COMPLETE"] and (out / "sweep.json").is_file()


SMALL = """sampler: {name: random, seed: 0}
pruner: {name: none}
params:
  train.stages.0.lr: {log: [1.0e-3, 1.0e-1]}
"""
QUEUED = SMALL + "enqueue:\n  - {train.stages.0.lr: 1.0e-2}   # tried first, once\n"


def test_two_processes_share_one_sqlite_study_with_no_trial_twice(tmp_path, folder_data):
    cfg, sp = files(tmp_path, folder_data, QUEUED, epochs=1)
    args = [cfg, "--space", sp, "--trials", 4, "--out", tmp_path / "sw"]
    procs = [start(args, tmp_path, tmp_path / f"p{i}.log") for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, [log.read_text()[-2000:] for log in tmp_path.glob("p*.log")]
    done = trials(tmp_path / "sw")
    said = [(t.number, t.state.name, t.user_attrs) for t in done]
    assert sorted(t.number for t in done) == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in done), said
    assert sorted(p.name for p in (tmp_path / "sw" / "trials").iterdir()) == ["0", "1", "2", "3"]
    ran = [
        line.split(":")[0].split(" (")[0] for log in tmp_path.glob("p*.log") for line in log.read_text().splitlines()
    ]
    ran = [r for r in ran if r.startswith("trial ")]  # "trial N: ..." once when it starts, once when it ends
    assert sorted(ran) == sorted(f"trial {n}" for n in range(4) for _ in range(2))
    # seeded, yet no two workers draw the same point: trial n's draws come from (seed, n)
    assert len({t.params["train.stages.0.lr"] for t in done}) == 4
    # both workers queued the point; it ran once, first
    assert [t.number for t in done if t.params["train.stages.0.lr"] == 0.01] == [0]
    said_queued = [
        line for log in tmp_path.glob("p*.log") for line in log.read_text().splitlines() if "(queued" in line
    ]
    assert [line.split(" (")[0] for line in said_queued] == ["trial 0"]  # its start line says where it came from
    again = sweep(cfg, "--space", sp, "--trials", 5, "--out", tmp_path / "sw")  # the point is not queued again
    assert again.exit_code == 0 and [t.params["train.stages.0.lr"] for t in trials(tmp_path / "sw")].count(0.01) == 1


def wait_for_line(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + 120
    while text not in (log.read_text() if log.is_file() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_ctrl_c_then_kill_9_and_the_same_command_continues_the_study(tmp_path, folder_data, monkeypatch):
    """Ctrl-C stops after recording the running trial as failed and queueing its params; kill -9
    leaves it "running" until its heartbeat is stale, then it is failed and queued. Each time the
    same command goes on to N trials that count (the lost ones do not), and the lost trial's run
    continues from its checkpoint."""
    from trainer.sweep import study as sweeping

    cfg, sp = files(tmp_path, folder_data, SMALL, epochs=2)
    out = tmp_path / "sw"
    args = [cfg, "--space", sp, "--trials", 4, "--out", out]
    proc = start(args, tmp_path, tmp_path / "first.log", step_seconds=0.3)
    wait_for_line(proc, out / "trials" / "1" / "log.txt", "stage 1/1")  # trial 1 is training
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    first = trials(out)
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL", "WAITING"]
    assert "interrupted" in first[1].user_attrs["error"]
    assert first[2].system_attrs["fixed_params"] == first[1].params  # queued: Optuna's enqueue_trial
    assert (out / "trials.csv").is_file()  # the results so far are written
    proc = start(args, tmp_path, tmp_path / "second.log", step_seconds=0.3)
    wait_for_line(proc, tmp_path / "second.log", "trial 2 (trial 1 again, from its checkpoint)")
    time.sleep(1.0)
    proc.kill()  # kill -9: trial 2 stays "running" in the study, its heartbeat stops
    proc.wait()
    assert [t.state.name for t in trials(out)] == ["COMPLETE", "FAIL", "RUNNING"]
    monkeypatch.setattr(sweeping, "GRACE", 1)  # rather than waiting the real grace period out
    time.sleep(1.5)
    res = sweep(*args)
    assert res.exit_code == 0, res.output
    done = trials(out)
    assert [t.state.name for t in done] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    retry = done[3]  # trial 1's params, its run finished in its own folder from the last checkpoint
    assert retry.params == done[1].params and retry.user_attrs["run_dir"] == str(out / "trials" / "1")
    rows = (out / "trials" / "1" / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and sorted(retry.intermediate_values) == [1, 2]
    assert json.loads((out / "trials" / "1" / "status.json").read_text())["status"] == "finished"
    assert not (out / "trials" / "2").exists() and not (out / "trials" / "3").exists()
    assert "trial 3 (trial 2 again, from its checkpoint)" in res.output


def postgres(tmp: Path):
    """A throwaway PostgreSQL server in a temporary folder (run as nobody when we are root: the
    server refuses root). Yields its URL; skips when the binaries or the driver are missing."""
    pytest.importorskip("psycopg", reason="no PostgreSQL driver (pip install 'psycopg[binary]')")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: PostgreSQL's server refuses root")
    tmp.chmod(0o777)
    port = free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(tmp / "db"), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(tmp / "db"), "-o", opts, "-l", str(tmp / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", [
        *as_user,
        pg_ctl,
        "-D",
        str(tmp / "db"),
        "-m",
        "immediate",
        "stop",
    ]


def test_a_postgresql_study(tmp_path, folder_data):
    import tempfile

    pg = Path(tempfile.mkdtemp(prefix="trainer-pg-"))  # under /tmp itself: pytest's folders are root's only
    url, stop = postgres(pg)
    try:
        cfg, sp = files(tmp_path, folder_data, SMALL, epochs=1)
        res = sweep(cfg, "--space", sp, "--trials", 2, "--out", tmp_path / "sw", "--storage", url, "--study", "team")
        assert res.exit_code == 0, res.output
        done = optuna.load_study(study_name="team", storage=url).trials
        assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
        assert not (tmp_path / "sw" / "sweep.db").exists()  # the study lives in the server
        assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["storage"] == url
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(pg, ignore_errors=True)


def test_tpe_models_after_its_startup_trials():
    from trainer.sweep.samplers import make_sampler
    from trainer.sweep.space import Space

    params = {"train.wd": {"range": [0.0, 0.1]}}
    tpe = lambda **s: make_sampler(Space.model_validate({"sampler": s, "params": params})).inner  # noqa: E731
    assert tpe(seed=0, startup_trials=3)._n_startup_trials == 3 and tpe(seed=0)._n_startup_trials == 10


def test_the_pruner_is_asked_after_every_epoch_but_the_last():
    from trainer.run.early_stop import StoppedEarly
    from trainer.sweep.epochs import ReportEpochs

    class AlwaysPrune:  # a trial whose pruner always says stop
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True

    learn = SimpleNamespace(state=SimpleNamespace(valid={"accuracy": 0.5}, train_loss=1.0))
    trial = AlwaysPrune()
    last = ReportEpochs(trial, "accuracy", last_epoch=1)
    last.after_epoch(learn)  # the only epoch is the last: a finished trial, never pruned
    assert last.pruned is None and trial.reported == [(1, 0.5)]
    early = ReportEpochs(AlwaysPrune(), "accuracy", last_epoch=3)
    with pytest.raises(StoppedEarly):
        early.after_epoch(learn)
    assert early.pruned.startswith("pruned after epoch 1")


def test_the_time_budget_prunes_a_trial_on_course_to_break_it_and_one_that_did():
    from trainer.run.early_stop import StoppedEarly
    from trainer.sweep.epochs import ReportEpochs

    class Keep:  # a pruner that never stops a trial: only the budget does
        def report(self, value, step):
            pass

        def should_prune(self):
            return False

    learn = SimpleNamespace(state=SimpleNamespace(valid={"accuracy": 0.5}, train_loss=1.0))
    clock = [0.0]

    def epochs(report: ReportEpochs, seconds: list[float]) -> None:
        clock[0] = 5.0  # building the data and the model: 5 s, counted
        for s in seconds:
            report.before_epoch(learn)
            clock[0] += s
            report.after_epoch(learn)

    # 5 s + 40 s, then two more epochs of 40 s: on course for 125 s against 100
    tight = ReportEpochs(Keep(), "accuracy", 3, max_seconds=100, started=0.0, clock=lambda: clock[0])
    with pytest.raises(StoppedEarly):
        epochs(tight, [40, 40, 40])
    assert (
        tight.pruned
        == "pruned after epoch 1: on course for 125 s, over the time budget of 100 s (objective.max_seconds)"
    )
    # on course for 125 s against 130 until the last epoch is slow: finished, then over
    late = ReportEpochs(Keep(), "accuracy", 3, max_seconds=130, started=0.0, clock=lambda: clock[0])
    epochs(late, [40, 40, 50])
    assert late.pruned is None and late.over == "took 135 s, over the time budget of 130 s (objective.max_seconds)"
    kept = ReportEpochs(Keep(), "accuracy", 3, max_seconds=130, started=0.0, clock=lambda: clock[0])
    epochs(kept, [40, 40, 40])
    assert kept.pruned is None and kept.over is None
    # a resumed trial: 60 s spent by the lost process (started 60 s before this one) count
    resumed = ReportEpochs(Keep(), "accuracy", 3, (0.4,), max_seconds=130, started=-60.0, clock=lambda: clock[0])
    with pytest.raises(StoppedEarly):
        epochs(resumed, [40, 40])
    assert resumed.pruned.startswith("pruned after epoch 2: on course for 145 s")


BUDGET = """objective: {monitor: valid_loss, max_seconds: 50}
sampler: {name: grid}
pruner: {name: none}
params:
  train.stages.0.epochs: {choice: [3, 1]}
"""


def test_a_sweep_with_a_time_budget_prunes_the_trial_that_would_break_it(tmp_path, folder_data, monkeypatch):
    from trainer.sweep import epochs
    from trainer.train.loop import Learner

    clock, step = [0.0], Learner._one_batch

    def ten_seconds(self, xb, yb):  # each training step takes 10 s on the sweep's clock: 3 steps an epoch
        clock[0] += 10.0
        return step(self, xb, yb)

    monkeypatch.setattr(epochs, "now", lambda: clock[0])
    monkeypatch.setattr(Learner, "_one_batch", ten_seconds)
    cfg, space = files(tmp_path, folder_data, BUDGET, epochs=1)
    res = sweep(cfg, "--space", space, "--trials", 2, "--out", tmp_path / "sw")
    assert res.exit_code == 0, res.output
    by_epochs = {t.params["train.stages.0.epochs"]: t for t in trials(tmp_path / "sw")}
    assert by_epochs[1].state.name == "COMPLETE" and len(by_epochs[1].intermediate_values) == 1
    long = by_epochs[3]  # 30 s an epoch: on course for 90 s after its first
    assert long.state.name == "PRUNED" and len(long.intermediate_values) == 1, long
    note = "pruned after epoch 1: on course for 90 s, over the time budget of 50 s (objective.max_seconds)"
    assert long.user_attrs["note"] == note and note in res.output
    assert "epochs: 1" in (tmp_path / "sw" / "best.yaml").read_text()  # the best kept the budget


def test_a_did_you_mean_needs_the_last_part_close_too():
    from trainer.sweep.space import _hint

    assert _hint("train.pct_start", ["train.stages.0.lr", "train.wd"]) == ""  # difflib alone said train.stages.0.lr
    params = ["train.stages.0.lr", "train.stages.0.pct_start", "train.wd", "data.bs"]
    for typo, meant in [
        ("train.stages.0.LR", "train.stages.0.lr"),  # case aside
        ("train.stages.0.pct", "train.stages.0.pct_start"),
        ("train.stage.0.pct", "train.stages.0.pct_start"),
        ("train.stages.0.learning_rate", "train.stages.0.lr"),
        ("train.weight_decay", "train.wd"),
        ("data.batch_size", "data.bs"),
    ]:
        assert _hint(typo, params) == f"; did you mean '{meant}'?", typo
    assert _hint("pct_start", ["train.stages.0.lr", "train.stages.0.pct_start"]).endswith("'train.stages.0.pct_start'?")
    assert _hint("trian.wd", ["train.wd", "data.bs"]) == "; did you mean 'train.wd'?"


def test_a_queued_point_the_space_no_longer_holds_fails_its_trial_with_the_reason(tmp_path, folder_data):
    """A point queued, then the space file edited before it ran: Optuna would run it anyway (a raw
    warning) or, for a choice, hand back a value the space cannot map (a crash)."""
    space = "sampler: {name: random, seed: 0}\npruner: {name: none}\nparams:\n"
    space += "  train.wd: {range: [0.0, 0.1]}\n  data.bs: {choice: [8, 12]}\n"
    cfg, sp = files(tmp_path, folder_data, space, epochs=1)
    out = tmp_path / "sw"
    assert sweep(cfg, "--space", sp, "--trials", 1, "--out", out).exit_code == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'sweep.db'}")
    study.enqueue_trial({"train.wd": 0.05, "data.bs": 6})  # 6: a choice of the space before the edit
    study.enqueue_trial({"train.wd": 0.5, "data.bs": 8})  # 0.5: inside the range before the edit
    res = sweep(cfg, "--space", sp, "--trials", 4, "--out", out)
    assert res.exit_code == 0 and "Traceback" not in res.output and "Fixed parameter" not in res.output, res.output
    done = trials(out)
    assert [t.state.name for t in done] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert (
        done[1].user_attrs["error"] == "queued before the space changed: data.bs: 6 is not one of its choices [8, 12]"
    )
    assert done[2].user_attrs["error"] == "queued before the space changed: train.wd: 0.5 is outside [0.0, 0.1]"
    assert "trial 1: fail (queued before the space changed: data.bs: 6" in res.output
    assert not (out / "trials" / "1").exists()  # nothing trained


def test_a_storage_that_is_the_runs_mlflow_store_is_refused_before_anything(tmp_path, folder_data):
    pytest.importorskip("mlflow", reason="the track extra is not installed")
    cfg, sp = files(tmp_path, folder_data, SMALL, epochs=1)
    url = f"sqlite:///{tmp_path}/both.db"
    res = sweep(
        cfg,
        "--space",
        sp,
        "--trials",
        1,
        "--out",
        tmp_path / "sw",
        "--storage",
        url,
        "--set",
        f"track.mlflow.uri={url}",
    )
    assert res.exit_code == 2 and "the runs' MLflow store (track.mlflow) is this file" in res.output, res.output
    assert not (tmp_path / "sw").exists() and not (tmp_path / "both.db").exists()


def test_workers_with_different_out_folders_take_turns_on_one_sqlite_file(tmp_path):
    """The lock that makes taking a queued trial atomic on SQLite belongs to the database file (its
    real path), so a worker with another --out (same --storage) waits for it too; it is not written
    beside the user's database; a server database has none."""
    import fcntl
    import stat

    from trainer.sweep.study import Sweep, lock_file, one_at_a_time

    def worker(out: str, storage: str | None = None) -> Sweep:
        return Sweep(tmp_path / "c.yaml", [], None, tmp_path / out, 1, storage=storage)

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "team.db").touch()
    (tmp_path / "link.db").symlink_to(shared / "team.db")
    a, b = worker("a", f"sqlite:///{shared / 'team.db'}"), worker("b", f"sqlite:///{tmp_path / 'link.db'}")
    assert lock_file(a) == lock_file(b) != lock_file(worker("c"))
    # the default database's lock is the one a worker naming that file as --storage takes
    assert lock_file(worker("c")) == lock_file(worker("d", f"sqlite:///{tmp_path / 'c' / 'sweep.db'}"))
    assert lock_file(worker("e", "postgresql+psycopg://u:p@host/db")) is None
    with one_at_a_time(a), open(lock_file(b)) as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sorted(p.name for p in shared.iterdir()) == ["team.db"]  # nothing beside the user's file
    assert stat.S_IMODE(lock_file(a).stat().st_mode) == 0o666  # other users' workers open it too
