"""What a sweep leaves in its folder: trials.csv, best.yaml (runnable with `trainer fit`), and
Optuna's own matplotlib plots of the optimisation history and the parameter importances."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from trainer.config import dump_config
from trainer.run.rundir import write_table
from trainer.storage import PNG_MARK, atomic_write_bytes, atomic_write_text
from trainer.sweep.database import lost
from trainer.sweep.space import trial_config


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: number, state, value, seconds, its params, its run directory and error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "seconds": round(seconds, 1) if seconds is not None else None,
                **{f"params.{k}": v for k, v in t.params.items()},
                "run_dir": t.user_attrs.get("run_dir", ""),
                "note": t.user_attrs.get("error") or t.user_attrs.get("note") or "",
            }
        )
    return rows


def best_trials(study: optuna.Study, n: int = 10) -> list[dict]:
    """The n best complete trials, best first."""
    done = [r for r in trial_rows(study) if r["state"] == "complete" and r["value"] is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda r: -r["value"] if maximize else r["value"])[:n]


def write_results(study: optuna.Study, out: Path, config: Path, sets: list[str], monitor: str) -> list[Path]:
    """trials.csv always; best.yaml and the plots once a trial has completed. Returns what it wrote."""
    rows = trial_rows(study)
    columns = ["number", "state", "value", "seconds"] + sorted({k for r in rows for k in r if k.startswith("params.")})
    write_table(out / "trials.csv", rows, columns + ["run_dir", "note"])
    written = [out / "trials.csv"]
    best = best_trials(study, 1)
    if not best:
        return written
    b = best[0]
    params = {k.removeprefix("params."): v for k, v in b.items() if k.startswith("params.")}
    values = {k: from_optuna(v) for k, v in params.items()}
    cfg = trial_config(config, sets, values)
    head = (
        f"# trainer sweep: the best of {len(rows)} trial(s): trial {b['number']}, {monitor} {b['value']:.6g}\n"
        f"# its run: {b['run_dir']}\n# train it again: trainer fit {out / 'best.yaml'}\n"
    )
    atomic_write_text(out / "best.yaml", head + dump_config(cfg))
    written.append(out / "best.yaml")
    written += plots(study, out)
    return written


def from_optuna(shown):
    """A param as the config takes it: a list choice went to Optuna as its JSON text."""
    if isinstance(shown, str) and shown.startswith("["):
        try:
            return json.loads(shown)
        except ValueError:
            return shown
    return shown


def plots(study: optuna.Study, out: Path) -> list[Path]:
    """history.png and, with two or more complete trials, importances.png (Optuna's plots)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # no display needed (Optuna draws through pyplot)
    from optuna.visualization import matplotlib as ovm

    made = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    wanted = [("history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2 and any(t.distributions for t in complete):
        wanted.append(("importances.png", ovm.plot_param_importances))
    for name, plot in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of params that never varied
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        _save(fig, out / name)
        made.append(out / name)
    return made


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": PNG_MARK})  # ours, as every picture we write
    plt.close(fig)  # Optuna draws through pyplot: close what it opened
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def all_failed(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The first trial, when every trial of the study failed for its own reasons (none lost)."""
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL and not lost(t)]
    return failed[0] if failed and len(failed) == len(trials) else None


def summary_line(study: optuna.Study) -> str:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    held = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials yet"
    return f"study '{study.study_name}': {held}"


def in_folder(run_dir: Path, folder: Path) -> Path:
    """A trial's run directory under the sweep folder as given (the study keeps the path as the
    sweep wrote it: relative to where it ran, or a folder since moved)."""
    here = folder / "trials" / run_dir.name
    return here if run_dir.parent.name == "trials" and here.is_dir() else run_dir
