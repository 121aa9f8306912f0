"""track: TensorBoard and MLflow, read back through their own readers (EventAccumulator,
MlflowClient on a SQLite store): params, metric history, artifacts, tags; a resumed run continues
the same MLflow run and TensorBoard folder with no step twice; a tracker that is down or fails
costs one warning, never the run; a tracker that is not installed is refused before any work."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.runs import Crash, CrashAt, free_port, metrics_without_seconds
from trainer.config import load_config
from trainer.run import fit as spine

pytest.importorskip("tensorboard", reason="the track extra (pip install -e '.[track]') is not installed")
mlflow = pytest.importorskip("mlflow", reason="the track extra (pip install -e '.[track]') is not installed")

STAGES = "[{name: head, epochs: 1, lr: 1.0e-2}, {name: all, epochs: 2, lr: 5.0e-3}]"  # 4 batches an epoch


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """MLflow keeps a SQLite store's artifacts in ./mlruns: in the test's folder, not the project's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


def config(tmp_path: Path, data: Path, track: str, name: str = "tiny") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(data, stages=STAGES).replace("name: tiny", f"name: {name}") + f"track: {track}\n")
    return cfg


def mlflow_run(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_both_trackers_hold_the_run(tmp_path, folder_data, store, monkeypatch):
    repo = tmp_path / "repo"  # the working directory's commit becomes a tag
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    monkeypatch.chdir(repo)
    cfg = config(
        tmp_path, folder_data, f"{{tensorboard: true, mlflow: {{uri: '{store}', experiment: both}}, every: 3}}"
    )
    result = spine.fit(load_config(cfg), tmp_path / "run")
    rows = result.metrics

    client, run = mlflow_run(store, "both")
    assert run.info.status == "FINISHED" and run.info.run_name == "tmp_path/run".replace("tmp_path", tmp_path.name)
    params = run.data.params
    assert params["train.stages.0.lr"] == "0.01" and params["train.stages.1.name"] == "all"
    assert params["data.bs"] == "8" and params["seed"] == "0"
    tags = run.data.tags
    assert tags["trainer.version"] and tags["torch.version"] and tags["device"] == "cpu"
    if commit:
        assert tags["git.commit"] == commit
    assert history(client, run.info.run_id, "epoch/valid_loss") == [
        (i + 1, r["valid_loss"]) for i, r in enumerate(rows)
    ]
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [3, 6, 9, 12]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "metrics.csv", "losses.png"}

    valid = scalars(tmp_path / "run", "epoch/valid_loss")  # at each epoch's last step, as Lightning
    assert [s for s, _ in valid] == [4, 8, 12]
    assert [v for _, v in valid] == pytest.approx([r["valid_loss"] for r in rows])
    assert [s for s, _ in scalars(tmp_path / "run", "train/loss")] == [3, 6, 9, 12]
    assert "mlflow: run " + run.info.run_id in (tmp_path / "run" / "log.txt").read_text()


def test_mlflow_true_tracks_where_mlflow_itself_would(tmp_path, folder_data, monkeypatch, capsys):
    # MLflow 3 refuses the old file:./mlruns store: the default is MLflow's own, a SQLite file here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spine.fit(load_config(config(tmp_path, folder_data, "{mlflow: true}", name="plain")), tmp_path / "run")
    _, run = mlflow_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "plain")
    assert run.info.status == "FINISHED" and "warning" not in capsys.readouterr().err
    assert (
        f"mlflow: run {run.info.run_id} in experiment 'plain' at sqlite:///mlflow.db"
        in (tmp_path / "run" / "log.txt").read_text()
    )


@pytest.mark.parametrize("crash", [(7,), (2, "after_epoch", 99)], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_run_continues_the_same_mlflow_run_and_tensorboard_folder(tmp_path, folder_data, store, crash):
    track = f"{{tensorboard: true, mlflow: {{uri: '{store}', experiment: resumed-{len(crash)}}}, every: 1}}"
    cfg = config(tmp_path, folder_data, track)
    ref = load_config(cfg)  # the uninterrupted run, to TensorBoard only (the experiment holds one run)
    reference = spine.fit(
        ref.model_copy(update={"track": ref.track.model_copy(update={"mlflow": None})}), tmp_path / "reference"
    )
    with pytest.raises(Crash):
        spine.fit(load_config(cfg), tmp_path / "run", callbacks=[CrashAt(*crash)])
    spine.fit(load_config(cfg), resume=tmp_path / "run")
    assert metrics_without_seconds(tmp_path / "run") == metrics_without_seconds(tmp_path / "reference")

    client, run = mlflow_run(store, f"resumed-{len(crash)}")  # one MLflow run, continued
    assert run.info.status == "FINISHED"
    steps = [s for s, _ in history(client, run.info.run_id, "train/loss")]
    assert steps == list(range(1, 13))  # every step once, none twice
    want = [(i + 1, r["valid_loss"]) for i, r in enumerate(reference.metrics)]
    assert history(client, run.info.run_id, "epoch/valid_loss") == want
    # TensorBoard: the same folder; what the resume computed again replaced, not doubled
    assert scalars(tmp_path / "run", "train/loss") == scalars(tmp_path / "reference", "train/loss")
    assert scalars(tmp_path / "run", "epoch/valid_loss") == scalars(tmp_path / "reference", "epoch/valid_loss")


def test_an_mlflow_server_that_does_not_answer_costs_one_warning(tmp_path, folder_data, capsys):
    cfg = config(tmp_path, folder_data, f"{{mlflow: {{uri: 'http://127.0.0.1:{free_port()}'}}}}")
    result = spine.fit(load_config(cfg), tmp_path / "run")
    err = capsys.readouterr().err
    assert err.count("warning: mlflow:") == 1 and "the run goes on" in err
    assert len(result.metrics) == 3
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"
    assert "warning: mlflow:" in (tmp_path / "run" / "log.txt").read_text()


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_goes_on(tmp_path, folder_data, store, capsys, monkeypatch):
    from trainer.run import trackers

    sent = []

    def send(self):
        sent.append(len(self.pending))
        if len(sent) == 2:
            raise ConnectionError("the server went away")
        self.pending = []

    monkeypatch.setattr(trackers.Mlflow, "send", send)
    cfg = config(tmp_path, folder_data, f"{{tensorboard: true, mlflow: {{uri: '{store}', experiment: failing}}}}")
    result = spine.fit(load_config(cfg), tmp_path / "run")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "mlflow: the server went away" in err
    assert len(sent) == 2 and len(result.metrics) == 3  # nothing sent after the failure; the run finished
    assert len(scalars(tmp_path / "run", "epoch/valid_loss")) == 3  # the other tracker went on


@pytest.mark.parametrize("key,module", [("tensorboard: true", "tensorboard"), ("mlflow: {}", "mlflow")])
def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path, folder_data, monkeypatch, key, module):
    from typer.testing import CliRunner

    from trainer.cli import app
    from trainer.run import tracking

    monkeypatch.setattr(tracking, "installed", lambda m: m != module)
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, folder_data, f"{{{key}}}")
    res = CliRunner().invoke(app, ["fit", str(cfg)])
    assert res.exit_code == 2
    assert f"track.{module}: needs the" in res.output and "pip install -e '.[track]'" in res.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", ["tables", "text"])
def test_a_mlflow_db_that_is_not_mlflows_is_refused_before_any_work(tmp_path, folder_data, monkeypatch, content):
    """MLflow adds its tables to any SQLite file it is given: a user's own ./mlflow.db is left alone."""
    import contextlib
    import sqlite3

    from typer.testing import CliRunner

    from trainer.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mine = tmp_path / "mlflow.db"
    if content == "tables":
        with contextlib.closing(sqlite3.connect(mine)) as db:
            db.execute("create table orders (id integer)")
    else:
        mine.write_text("my notes on MLflow\n")
    before = mine.read_bytes()
    cfg = config(tmp_path, folder_data, "{mlflow: true}")
    res = CliRunner().invoke(app, ["fit", str(cfg)])
    said = "holds another program's tables (orders); MLflow would add its own" if content == "tables" else "is not a"
    assert res.exit_code == 2 and "c.yaml:" in res.output and said in res.output, res.output
    assert "track.mlflow: sqlite:///mlflow.db:" in res.output and "Traceback" not in res.output
    assert mine.read_bytes() == before and not (tmp_path / "runs").exists()
    # the URI from the environment is said to be; one given in the config is named as its key
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    res = CliRunner().invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2 and "sqlite:///mlflow.db (from $MLFLOW_TRACKING_URI): " in res.output, res.output
    given = config(tmp_path, folder_data, "{mlflow: {uri: 'sqlite:///mlflow.db'}}")
    res = CliRunner().invoke(app, ["check", str(given)])
    assert res.exit_code == 2 and "track.mlflow.uri: sqlite:///mlflow.db: " in res.output, res.output
    assert res.output.rstrip().endswith("; name another file")  # no description of the key after it
    assert mine.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "mlflow.db"]
