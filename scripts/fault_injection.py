"""Fault injection: real `trainer fit` processes killed, signalled and starved of disk, then resumed;
each outcome compared with an uninterrupted run. Prints one table: case, tries, clean, defects.

    python scripts/fault_injection.py --kills 6 --seed 0

Faults: kill -9 at random steps; kill -9 in the middle of writing a checkpoint (the write is held
open by a test instrument); SIGINT and SIGTERM at random steps; a full disk (a file-size limit,
RLIMIT_FSIZE) while saving. Clean means: the interrupted process ends as promised (exit 130/143
after a signal, exit 1 naming the file and "no space left" on a full disk, no half-written file
left behind), and `--resume` then gives metrics.csv (all but seconds) and final weights
identical to the uninterrupted run's. The data is tiny and generated; the run has two stages,
the second with lr: auto, so the found lr must survive the interruptions too.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_folder_dataset  # noqa: E402

STEPS = 16  # 4 batches an epoch: stage 1 one epoch, stage 2 three epochs

# Loaded into each trainer process through PYTHONPATH: slows every step (so a kill lands where it is
# aimed) and, when asked, holds a checkpoint write open half-way, after touching a marker file.
INSTRUMENT = """
import os, time
_step = float(os.environ.get("FAULT_STEP_SECONDS", "0") or 0)
_hold = os.environ.get("FAULT_HOLD_SAVE_AT")
if _step or _hold:
    from trainer import storage
    from trainer.train import loop

    _batch = loop.Learner._one_batch
    def _slow(self, xb, yb):
        time.sleep(_step)
        _batch(self, xb, yb)
    loop.Learner._one_batch = _slow

    _write, _saves = storage.atomic_write_bytes, [0]
    def _held(path, write):
        def half(f):
            write(f)
            if path.name == "last.pt":
                _saves[0] += 1
                if _hold and _saves[0] == int(_hold):
                    open(os.environ["FAULT_MARKER"], "w").close()
                    time.sleep(60)
        return _write(path, half)
    storage.atomic_write_bytes = _held
"""


def config(tmp: Path) -> Path:
    data = make_folder_dataset(tmp / "data")
    path = tmp / "c.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: faults
        seed: 0
        data: {{layout: folder, path: '{data}', bs: 8}}
        model: {{arch: bnresnet, layers: [8, 16], ps: 0.25}}
        transforms: {{preset: side_on, max_zoom: 1.1}}
        train:
          checkpoint_every: 1
          stages:
            - {{name: head, epochs: 1, lr: 1.0e-2, freeze: body}}
            - {{name: all, epochs: 3, lr: auto, unfreeze: true}}
        """)
    )
    return path


def start(cfg: Path, args: list[str], log: Path, env: dict, limit: int | None = None) -> subprocess.Popen:
    def preexec():
        if limit is not None:  # writes past the limit fail with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "fit", str(cfg), *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=preexec,
    )


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def same_as(reference: Path, run: Path) -> bool:
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    return metrics(reference) == metrics(run) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_done(run: Path) -> int:
    """Optimizer steps recorded in the newest checkpoint (0 before the first)."""
    try:
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return 0
    return int(state["callbacks"]["recorder"]["steps"]["n"])


def resume_matches(cfg: Path, run: Path, reference: Path, env: dict) -> tuple[bool, str]:
    proc = start(cfg, ["--resume", str(run)], run.parent / f"{run.name}.resume.log", env)
    if proc.wait() != 0:
        return False, f"resume exited {proc.returncode}"
    if list((run / "checkpoints").glob(".*.tmp")):
        return False, "a temporary file was left in checkpoints/"
    return (True, "") if same_as(reference, run) else (False, "resumed run differs from the uninterrupted one")


def interrupt(cfg, tmp, name, reference, env, at_step, how) -> tuple[bool, str]:
    run, log = tmp / name, tmp / f"{name}.log"
    proc = start(cfg, ["--out", str(run)], log, {**env, "FAULT_STEP_SECONDS": "0.05"})
    while steps_done(run) < at_step and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        return False, f"the run ended (exit {proc.returncode}) before step {at_step}"
    os.kill(proc.pid, how)
    code = proc.wait()
    expected = {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}[how]
    if code != expected:
        return False, f"exit {code}, expected {expected}: {log.read_text()[-300:]}"
    if how != signal.SIGKILL and "resume with:" not in log.read_text():
        return False, "no resume command printed"
    return resume_matches(cfg, run, reference, env)


def kill_mid_save(cfg, tmp, name, reference, env, save) -> tuple[bool, str]:
    run, marker = tmp / name, tmp / f"{name}.saving"
    proc = start(
        cfg,
        ["--out", str(run)],
        tmp / f"{name}.log",
        {**env, "FAULT_HOLD_SAVE_AT": str(save), "FAULT_MARKER": str(marker)},
    )
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        return False, f"the run ended (exit {proc.returncode}) before save {save}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not list((run / "checkpoints").glob(".*.tmp")):
        return False, "no half-written file: the kill missed the write"
    return resume_matches(cfg, run, reference, env)


def disk_full(cfg, tmp, name, reference, env, limit) -> tuple[bool, str]:
    run, log = tmp / name, tmp / f"{name}.log"
    code = start(cfg, ["--out", str(run)], log, env, limit=limit).wait()
    text = log.read_text()
    if code != 1 or "no space left" not in text or "Traceback" in text:
        return False, f"exit {code}: {text.strip().splitlines()[-1][:200] if text.strip() else ''}"
    if list(run.rglob(".*.tmp")):
        return False, "a partial file was left behind"
    if not (run / "checkpoints" / "last.pt").exists():
        return True, "(stopped before its first checkpoint: nothing to resume)"
    return resume_matches(cfg, run, reference, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=4, help="random moments for each signal (SIGKILL, SIGINT, SIGTERM)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="faults-"))
    instrument = tmp / "instrument"
    instrument.mkdir()
    (instrument / "sitecustomize.py").write_text(INSTRUMENT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(instrument)]),
        "OMP_NUM_THREADS": "1",
        "TRAINER_CACHE": str(tmp / "cache"),
    }
    cfg = config(tmp)
    ref = start(cfg, ["--out", str(tmp / "reference")], tmp / "reference.log", env).wait()
    assert ref == 0, (tmp / "reference.log").read_text()

    cases: dict[str, list[tuple[bool, str]]] = {}
    for how in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM):
        for i in range(a.kills):
            at = rng.randint(1, STEPS - 1)
            result = interrupt(cfg, tmp, f"{how.name}-{i}", tmp / "reference", env, at, how)
            cases.setdefault(f"{how.name} at a random step", []).append(result)
    for save in (2, 5, 9):  # mid-epoch, a stage's first save (after lr_find), late
        cases.setdefault("SIGKILL while writing last.pt", []).append(
            kill_mid_save(cfg, tmp, f"mid-save-{save}", tmp / "reference", env, save)
        )
    for limit in (40_000, 90_000, 110_000):  # bytes: the first checkpoint is too big, or a later one
        cases.setdefault("disk full (file-size limit)", []).append(
            disk_full(cfg, tmp, f"full-{limit}", tmp / "reference", env, limit)
        )

    print(f"{'case':<32} {'tries':>5} {'clean':>5} {'defects':>7}")
    for name, results in cases.items():
        clean = sum(ok for ok, _ in results)
        print(f"{name:<32} {len(results):>5} {clean:>5} {len(results) - clean:>7}")
        for ok, why in results:
            if not ok:
                print(f"    defect: {why}")
    total = [r for rs in cases.values() for r in rs]
    print(f"{'all':<32} {len(total):>5} {sum(ok for ok, _ in total):>5} {sum(not ok for ok, _ in total):>7}")
    print(f"(runs in {tmp})")


if __name__ == "__main__":
    main()
