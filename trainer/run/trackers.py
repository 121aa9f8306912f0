"""The two trackers behind `track:`. Each has the same few methods, called by tracking.Trackers
(which drops one that fails): start, log_steps, log_epoch, finish, abandon, state_dict."""

from __future__ import annotations

import time
from pathlib import Path

MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED"}  # else FAILED


class TensorBoard:
    """Event files in RUN/tensorboard/ through torch.utils.tensorboard. A resumed run writes to the
    same folder with purge_step: events from the resume point on, computed again, are replaced."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=10)
        self.resumed = purge_step is not None

    def start(self, params: dict, tags: dict) -> None:
        if not self.resumed:
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)
        self.writer.add_text("tags", "\n".join(f"- {k}: {v}" for k, v in tags.items()), 0)

    def log_steps(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_epoch(self, values: dict, epoch: int, step: int) -> None:
        for k, v in {**values, "epoch": epoch}.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, status: str, files: list[Path]) -> None:
        self.writer.close()

    def abandon(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already failing; the warning is out
            pass

    def state_dict(self) -> dict:
        return {}


class Mlflow:
    """An MLflow run through MlflowClient (no global active run, so nothing leaks into the user's
    own mlflow code). Step metrics are sent in batches (every 10 s and at each epoch end); a
    resumed run continues its MLflow run and skips the steps it already holds."""

    def __init__(self, uri: str, experiment: str, name: str, run_id: str | None = None):
        from mlflow import MlflowClient

        from trainer.run.tracking import quiet_mlflow

        quiet_mlflow()
        self.client, self.pending, self.sent_at = MlflowClient(uri), [], time.monotonic()
        self.last = {"step": 0, "epoch": 0}  # the newest step of each axis the run holds
        if run_id is not None:
            self.run_id, self.new = run_id, False
            self.client.update_run(run_id, status="RUNNING")
            self.last = {"step": self._newest("train/loss"), "epoch": self._newest("epoch/train_loss")}
        else:
            found = self.client.get_experiment_by_name(experiment)
            exp = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id, self.new = self.client.create_run(exp, run_name=name).info.run_id, True

    def _newest(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def start(self, params: dict, tags: dict) -> None:
        from mlflow.entities import Param, RunTag

        if self.new:  # a resumed run's params are already there (and MLflow refuses to change one)
            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_steps(self, values: dict, step: int) -> None:
        if step > self.last["step"]:
            self._add(values, step)
        if time.monotonic() - self.sent_at >= 10:
            self.send()

    def log_epoch(self, values: dict, epoch: int, step: int) -> None:
        if epoch > self.last["epoch"]:
            self._add(values, epoch)
        self.send()

    def _add(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]

    def send(self) -> None:
        self.sent_at = time.monotonic()
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]  # MLflow's limit a call
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str, files: list[Path]) -> None:
        self.send()
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))

    def abandon(self) -> None:
        self.pending = []

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}
