"""`trainer fit CONFIG --devices N`: N processes on this machine through torch's own launcher.

It is `torchrun --standalone --nproc-per-node=N -m trainer fit CONFIG ...` (torch.distributed.run,
with its arguments built here), so the processes, their environment, the rendezvous and the
handling of a failed or signalled process are exactly torchrun's. The launcher's exit code is
the processes' when they all stopped the same way (130/143 after a signal), else 1.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

LAUNCHED_WITH = "--launched-with-devices"  # tells each process how the run was started (for the resume command)
INTERRUPTED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def fit_args(
    config: Path,
    sets: list[str] | None,
    out: Path | None,
    smoke: bool,
    resume: str | None,
    devices: int,
    allow_changes: bool = False,
) -> list[str]:
    """The `trainer fit` arguments each process gets: the same command, with --devices N said as
    how the run was started (so rank 0 prints a resume command with it)."""
    args = ["fit", str(config), *[a for s in sets or [] for a in ("--set", s)], LAUNCHED_WITH, str(devices)]
    if out is not None:
        args += ["--out", str(out)]
    if smoke:
        args.append("--smoke")
    if resume is not None:
        args += ["--resume", str(resume)]
    if allow_changes:
        args.append("--allow-changes")
    return args


def torchrun_args(n: int, args: list[str]) -> list[str]:
    return ["--standalone", f"--nproc-per-node={n}", "--max-restarts=0", "-m", "trainer", *args]


def exit_code(codes: list[int]) -> int:
    """130 or 143 when every failed process stopped on a signal (SIGTERM wins); the processes' code
    when they all failed alike (2: the config or the data was refused, on every rank); else 1."""
    if codes and all(c in INTERRUPTED for c in codes):
        return 128 + (signal.SIGTERM if any(abs(c) in (15, 143) for c in codes) else signal.SIGINT)
    if len(set(codes)) == 1 and codes[0] > 0:
        return codes[0]
    return 1


def launch(n: int, args: list[str], log=print) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(torchrun_args(n, args)))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        code = exit_code(codes)
        if code == 1:  # mixed or unexplained failures: say which process
            log(
                "; ".join(
                    f"process {rank} failed with exit code {f.exitcode}" for rank, f in sorted(e.failures.items())
                )
                + " (its output is above)"
            )
        return code
    except SignalException as e:  # the launcher itself was signalled: torchrun passed it on, they saved
        return 128 + int(e.sigval)
    return 0


def resume_command(base: list[str], devices: int | None = None) -> list[str]:
    """The command that resumes a run the way it was started: with --devices, or under torchrun."""
    if devices is not None:
        return [*base[:3], "--devices", str(devices), *base[3:]]
    if "LOCAL_WORLD_SIZE" in os.environ:  # plain torchrun (on each node, with its other options)
        return ["torchrun", f"--nproc-per-node={os.environ['LOCAL_WORLD_SIZE']}", "-m", "trainer", *base[1:]]
    return base


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
