"""Exact resume: find the run, check the config still matches it, restore every piece of state.

A checkpoint (pipeline.snapshot) holds the model, the optimizer, the AMP scaler, the position
(stage, epoch, batch), every random state, the partial epoch's loss sums, the metrics rows so far
and the state of each callback that keeps some (`state_dict`/`load_state_dict`: the Recorder's
steps, the best loss so far, ...). Data order and augmentation are functions of (seed, epoch,
batch index), so no loader state is needed. On the CPU with the same seed, a run killed at any
moment and resumed ends with the same metrics and bitwise the same weights.

status.json says whether a run is running, finished, interrupted, diverged or failed; a run
killed with SIGKILL still says "running", and `--resume auto` takes the newest run that is not
finished and not in use: a training process holds an OS lock on RUN_DIR/.lock, which a second
process (a resume of a live run, or --out into it) is refused.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer import checkpoint
from trainer.guard import TrainingDiverged
from trainer.config import Config, dump_config
from trainer.distributed import own_state, rank_states, unwrap
from trainer.rundir import RunDir
from trainer.runtime import set_rng_state
from trainer.signals import Interrupted

STATUS = "status.json"
# Keys a resumed run may change: they do not change what is computed.
MAY_CHANGE = {"name", "device", "compile", "data.cache_dir", "data.valid_bs", "data.on_device",
              "train.checkpoint_every", "train.on_nan", "distributed.backend"}
STATE_VERSION = 1


class ResumeError(ValueError):
    """Nothing to resume, or not this way; the CLI prints it and exits 2."""


# ---- run status -------------------------------------------------------------------------

def write_status(run: RunDir, status: str, **extra) -> None:
    run.write_json(STATUS, {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def read_status(run_dir: Path) -> str:
    try:
        return RunDir(Path(run_dir)).read_json(STATUS).get("status", "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _lock(run_dir: Path):
    """An exclusive lock on RUN_DIR/.lock, or None when another process holds it. The OS drops it
    when the process ends, however it ends (kill -9 included), so a stale lock cannot exist."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not protected from a second writer
        return open(Path(run_dir) / ".lock", "a")
    f = open(Path(run_dir) / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def in_use(run_dir: Path) -> bool:
    if not (Path(run_dir) / ".lock").exists():
        return False
    f = _lock(run_dir)
    if f is not None:
        f.close()
    return f is None


@contextlib.contextmanager
def run_status(run: RunDir):
    """Holds the run's lock; running while inside; finished, interrupted, diverged or failed after.
    Ranks other than 0 of a multi-process run neither lock nor write (rank 0 does, for them all)."""
    if not run.writes:
        yield
        return
    lock = _lock(run.path)
    if lock is None:
        raise ResumeError(f"{run.path} is being trained by another process right now")
    try:
        with _status(run):
            yield
    finally:
        lock.close()


@contextlib.contextmanager
def _status(run: RunDir):
    write_status(run, "running")
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        write_status(run, "interrupted")
        raise
    except TrainingDiverged as e:
        write_status(run, "diverged", message=str(e))
        raise
    except BaseException as e:
        write_status(run, "failed", message=f"{type(e).__name__}: {e}"[:500])
        raise
    write_status(run, "finished")


# ---- which run -----------------------------------------------------------------------------

def find_unfinished(name: str, root: str | Path = "runs") -> Path:
    """The unfinished run of this config name that was checkpointed last."""
    folder = Path(root) / name
    found = [last.parent.parent for last in folder.glob("*/checkpoints/last.pt")
             if read_status(last.parent.parent) != "finished" and not in_use(last.parent.parent)]
    if not found:
        raise ResumeError(f"--resume auto: no unfinished run of '{name}' with a checkpoint under {folder}/ "
                          "(start one without --resume)")
    return max(found, key=lambda d: ((d / "checkpoints" / "last.pt").stat().st_mtime_ns, d.name))


def resolve(spec: str | Path, name: str, root: str | Path = "runs") -> Path:
    run_dir = find_unfinished(name, root) if str(spec) == "auto" else Path(spec)
    if not (run_dir / "config.yaml").is_file():
        raise ResumeError(f"--resume {spec}: {run_dir} is not a run directory (no config.yaml)")
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise ResumeError(f"--resume {spec}: {run_dir} has no checkpoints/last.pt yet (it stopped before "
                          "its first checkpoint): start it again without --resume")
    if in_use(run_dir):
        raise ResumeError(f"--resume {spec}: {run_dir} is being trained by another process right now")
    if read_status(run_dir) == "finished":
        raise ResumeError(f"--resume {spec}: {run_dir} finished; nothing to resume (start a new run without "
                          "--resume)")
    return run_dir


def check_fresh_out(out: Path) -> None:
    """--out into a folder that already holds a run would write over its checkpoints and metrics."""
    if in_use(out):
        raise ResumeError(f"--out {out}: that run is being trained by another process right now")
    if (Path(out) / "checkpoints" / "last.pt").exists():
        raise ResumeError(f"--out {out} already holds a run (checkpoints/last.pt): continue it with "
                          f"--resume {out}, or choose another folder")


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        return {k: v for key, val in data.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(data, list) and any(isinstance(v, dict) for v in data):
        return {k: v for i, val in enumerate(data) for k, v in _flat(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: data}


def reconcile(cfg: Config, run_dir: Path) -> Config:
    """The config to resume with: the run's own seed, and nothing changed that would change the
    results (a different lr or batch size after a resume is a different run, not a resume)."""
    try:
        saved = Config.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    except Exception as e:  # noqa: BLE001 - any damage to the saved config means we cannot check it
        raise ResumeError(f"{run_dir / 'config.yaml'}: cannot read the run's config ({e})") from None
    if cfg.seed is None:
        cfg = cfg.model_copy(update={"seed": saved.seed})
    new, old = _flat(yaml.safe_load(dump_config(cfg))), _flat(yaml.safe_load(dump_config(saved)))
    changed = sorted(k for k in new.keys() | old.keys()
                     if new.get(k) != old.get(k) and not any(k == m or k.startswith(m + ".") for m in MAY_CHANGE))
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ResumeError(f"--resume {run_dir}: the config differs from the run's config.yaml ({diffs}). "
                          "Resume with the same config and --set options, or start a new run")
    return cfg


# ---- what to restore -----------------------------------------------------------------------

@dataclass
class ResumePoint:
    run_dir: Path
    state: dict
    stage: int        # the stage to run next
    epoch: int        # the epoch within it
    batch: int        # the batch within that epoch
    fresh_stage: bool  # the checkpoint closed the previous stage: only weights and random states carry over
    stale: list = field(default_factory=list)  # temporary files of an interrupted save, removed

    @property
    def best(self) -> float:
        return self.state.get("callbacks", {}).get("Checkpointer", {}).get("best", float("inf"))

    def describe(self, stage_names: list[str]) -> str:
        if self.stage >= len(stage_names):
            return "after the last stage"
        return (f"stage {self.stage + 1}/{len(stage_names)} '{stage_names[self.stage]}', epoch {self.epoch + 1}, "
                f"batch {self.batch + 1}")


def load_point(run_dir: Path, stage_epochs: list[int]) -> ResumePoint:
    """Reads last.pt (refusing anything but tensors and plain data) and says where to continue."""
    stale = checkpoint.remove_stale_temps(run_dir / "checkpoints")
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    missing = {"model", "optimizer", "stage", "epoch", "batch", "rng"} - set(state)
    if missing or state.get("version", 0) != STATE_VERSION:
        raise ResumeError(f"{run_dir / 'checkpoints' / 'last.pt'}: not a resumable checkpoint of this "
                          f"version (missing {sorted(missing) or 'the version'})")
    best_pt = run_dir / "checkpoints" / "best.pt"
    if best_pt.is_file():  # never let a resumed run replace best.pt with something worse
        best = checkpoint.load(best_pt).get("best_valid_loss", float("inf"))
        state.setdefault("callbacks", {}).setdefault("Checkpointer", {"best": best})
        state["callbacks"]["Checkpointer"]["best"] = min(best, state["callbacks"]["Checkpointer"]["best"])
    stage, epoch, batch = int(state["stage"]), int(state["epoch"]), int(state["batch"])
    if stage >= len(stage_epochs):
        raise ResumeError(f"{run_dir}: the checkpoint is at stage {stage + 1}, the config has "
                          f"{len(stage_epochs)} stage(s)")
    if batch == 0 and epoch >= stage_epochs[stage]:
        return ResumePoint(run_dir, state, stage + 1, 0, 0, True, stale)
    return ResumePoint(run_dir, state, stage, epoch, batch, False, stale)


def start_session(sess, point: ResumePoint, names: list[str]) -> None:
    """Before the first stage: the metrics rows up to the checkpoint (rows written after it are
    dropped, they are computed again) and the best loss so far."""
    sess.run.metrics = [dict(r) for r in point.state.get("metrics", [])]
    sess.run.rewrite_metrics()
    recorder = point.state.get("callbacks", {}).get("Recorder")
    if recorder is not None:  # the per-step record spans the whole run, earlier stages included
        sess.history.steps[:] = checkpoint.unpack_rows(recorder["steps"])
    sess.best = point.best
    sess.log(f"resuming {point.run_dir} from checkpoints/last.pt: {point.describe(names)}"
             + (f" (removed {len(point.stale)} temporary file(s) of an interrupted save)" if point.stale else ""))


def restore(learn, point: ResumePoint) -> tuple[int, int]:
    """Puts the checkpoint into a freshly built learner; returns (start epoch, start batch).
    The random states go last, so nothing done while building can shift them."""
    state = point.state
    unwrap(learn.model).load_state_dict(state["model"])  # checkpoints hold the plain module
    if not point.fresh_stage:
        if state.get("n_batches", len(learn.train_dl)) != len(learn.train_dl):
            raise ResumeError(f"{point.run_dir}: the checkpoint's epoch had {state['n_batches']} batches, "
                              f"this data gives {len(learn.train_dl)} (did the dataset change?)")
        learn.opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 (a CPU run): the fresh scaler is right
            learn.scaler.load_state_dict(state["scaler"])
        s = learn.state
        s.epoch_loss_sum, s.epoch_loss_count = state["train_loss_sum"], state["train_loss_count"]
        s.skipped_steps = state.get("skipped_steps", 0)
        load_callback_states(learn.callbacks, state.get("callbacks", {}))
        load_callback_states(learn.callbacks, own_state(state, "callbacks_ranks", {}))  # this process's own
    set_rng_state(own_state(state, "rng_ranks", state["rng"]))
    return point.epoch, point.batch


# ---- what a checkpoint carries besides the model and optimizer --------------------------------

def _keyed(callbacks) -> dict:
    out, seen = {}, {}
    for cb in callbacks:
        if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict"):
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = cb
    return out


def callback_states(callbacks) -> dict:
    return {name: cb.state_dict() for name, cb in _keyed(callbacks).items()}


def load_callback_states(callbacks, states: dict) -> None:
    for name, cb in _keyed(callbacks).items():
        if name in states:
            cb.load_state_dict(states[name])


def loop_state(learn, run: RunDir | None) -> dict:
    """The part of a checkpoint that lets a run continue mid-epoch exactly (see module doc)."""
    return {"version": STATE_VERSION, "n_batches": len(learn.train_dl), "skipped_steps": learn.state.skipped_steps,
            "callbacks": callback_states(learn.callbacks),
            **rank_states("callbacks_ranks", callback_states(c for c in learn.callbacks
                                                             if getattr(c, "per_rank", False))),
            "metrics": [dict(r) for r in run.metrics] if run is not None else []}
