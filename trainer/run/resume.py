"""Which run to continue, and whether the config still matches it (the checkpoint itself is
read and restored by trainer/run/state.py).

`--resume RUN` names the run; `--resume auto` takes the newest run of this config's name that is
not finished and not in use. A resumed run must be the same run: a different lr or batch size
after a resume is a different run, so the config may change only where it does not change what
is computed (MAY_CHANGE).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import Config, ConfigError, flat_keys, read_saved_config
from trainer.run.status import in_use, read_status

# Keys a resumed run may change: they do not change what is computed.
MAY_CHANGE = {
    "name",
    "device",
    "compile",
    "data.cache_dir",
    "data.valid_bs",
    "data.on_device",
    "train.checkpoint_every",
    "train.on_nan",
    "distributed.backend",
    "track",  # trackers watch the run; adding or changing one changes nothing computed
}


class ResumeError(ValueError):
    """Nothing to resume, or not this way; the CLI prints it and exits 2."""


def find_unfinished(name: str, root: str | Path = "runs") -> Path:
    """The unfinished run of this config name that was checkpointed last."""
    folder = Path(root) / name
    found = [
        last.parent.parent
        for last in folder.glob("*/checkpoints/last.pt")
        if read_status(last.parent.parent) not in ("finished", "stopped") and not in_use(last.parent.parent)
    ]
    if not found:
        raise ResumeError(
            f"--resume auto: no unfinished run of '{name}' with a checkpoint under {folder}/ "
            "(start one without --resume)"
        )
    return max(found, key=lambda d: ((d / "checkpoints" / "last.pt").stat().st_mtime_ns, d.name))


def resolve(spec: str | Path, name: str, root: str | Path = "runs") -> Path:
    run_dir = find_unfinished(name, root) if str(spec) == "auto" else Path(spec)
    if not (run_dir / "config.yaml").is_file():
        raise ResumeError(f"--resume {spec}: {run_dir} is not a run directory (no config.yaml)")
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise ResumeError(
            f"--resume {spec}: {run_dir} has no checkpoints/last.pt yet (it stopped before "
            "its first checkpoint): start it again without --resume"
        )
    if in_use(run_dir):
        raise ResumeError(f"--resume {spec}: {run_dir} is being trained by another process right now")
    if read_status(run_dir) == "finished":
        raise ResumeError(f"--resume {spec}: {run_dir} finished; nothing to resume (start a new run without --resume)")
    if read_status(run_dir) == "stopped":
        raise ResumeError(
            f"--resume {spec}: {run_dir} stopped early ({_reason(run_dir)}); nothing to resume: start a new run "
            "(with a larger train.early_stop.patience, or without it, to train longer)"
        )
    return run_dir


def _reason(run_dir: Path) -> str:
    try:
        reason = json.loads((run_dir / "status.json").read_text()).get("reason", "see its log.txt")
        return str(reason).removeprefix("stopped early: ")
    except (OSError, ValueError, AttributeError):
        return "see its log.txt"


def check_fresh_out(out: Path, marker: str = "status.json") -> None:
    """--out must be a new or empty folder, or a run of this tool (it holds `marker`) that never
    reached a checkpoint: a folder of the user's would have files replaced, a run's checkpoints
    and metrics overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ResumeError(f"--out {out}: is a file; give a folder for the run (a new or empty one)")
    if in_use(out):
        raise ResumeError(f"--out {out}: that run is being trained by another process right now")
    if (out / "checkpoints" / "last.pt").exists():
        raise ResumeError(
            f"--out {out} already holds a run (checkpoints/last.pt): continue it with "
            f"--resume {out}, or choose another folder"
        )
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not (out / marker).is_file():  # not a run directory of ours
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ResumeError(
            f"--out {out}: the folder holds files that are not a run of trainer ({shown}); "
            "nothing was written: give a new or empty folder"
        )


def saved_config(run_dir: Path) -> Config:
    try:
        return read_saved_config(run_dir / "config.yaml")
    except ConfigError as e:  # a damaged saved config means the resume cannot be checked
        raise ResumeError(f"cannot resume: {e}") from None


def reconcile(cfg: Config, run_dir: Path, changeable_from: int | None = None) -> tuple[Config, list[str]]:
    """The config to resume with: the run's own seed, and nothing changed that would change the
    results (a different lr or batch size after a resume is a different run, not a resume).
    changeable_from (--allow-changes): stages from this index on have not started, and may change
    (or be added or removed); those changes are returned, in words."""
    saved = saved_config(run_dir)
    if cfg.seed is None:
        cfg = cfg.model_copy(update={"seed": saved.seed})
    new, old = flat_keys(cfg.model_dump(mode="json")), flat_keys(saved.model_dump(mode="json"))
    changed = sorted(
        k
        for k in new.keys() | old.keys()
        if new.get(k) != old.get(k) and not any(k == m or k.startswith(m + ".") for m in MAY_CHANGE)
    )
    allowed = [k for k in changed if changeable_from is not None and _stage_of(k) >= changeable_from]
    refused = [k for k in changed if k not in allowed]
    if refused:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused[:6])
        more = (
            f"; --allow-changes lets stages from {changeable_from + 1} on change, they have not started"
            if changeable_from is not None
            else "; --allow-changes lets stages that have not started change"
        )
        raise ResumeError(
            f"--resume {run_dir}: the config differs from the run's config.yaml ({diffs}). "
            f"Resume with the same config and --set options, or start a new run{more}"
        )
    return cfg, [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in allowed]


def _stage_of(key: str) -> int:
    """The stage index of a key train.stages.K..., or -1 for any other key."""
    parts = key.split(".")
    return int(parts[2]) if parts[:2] == ["train", "stages"] and len(parts) > 2 and parts[2].isdigit() else -1
