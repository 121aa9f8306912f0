"""Test instruments for tests/test_distributed.py, loaded only when this folder is on PYTHONPATH.

TRAINER_TEST_SIGNAL_RANK / _STEP: the process of that rank sends itself SIGTERM at the start of
that training step (counted from 1 over the whole process), as a job scheduler or a user
signalling one process would. Only the one process gets it; the others must stop with it.

TRAINER_TEST_READONLY_RANK: in the process of that rank, every file write of the trainer (atomic
writes: checkpoints, tables, JSON; log lines; plots) raises, so a run that passes wrote nothing there.
"""

import os

_rank, _step = os.environ.get("TRAINER_TEST_SIGNAL_RANK"), int(os.environ.get("TRAINER_TEST_SIGNAL_STEP", "0") or 0)
if _rank is not None and _step > 0 and os.environ.get("RANK") == _rank:
    import signal

    from trainer.train import loop

    _one_batch, _count = loop.Learner._one_batch, [0]

    def _signalled_batch(self, xb, yb):
        _count[0] += 1
        if _count[0] == _step:
            os.kill(os.getpid(), signal.SIGTERM)
        _one_batch(self, xb, yb)

    loop.Learner._one_batch = _signalled_batch

if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("TRAINER_TEST_READONLY_RANK"):
    import builtins

    import matplotlib.figure

    from trainer import storage
    from trainer.run import rundir

    def _refuse(*args, **kwargs):
        raise RuntimeError(f"rank {os.environ['RANK']} tried to write a file: {args[:1]}")

    def _open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _refuse(file)
        return builtins.open(file, mode, *args, **kwargs)

    storage.atomic_write_bytes = _refuse
    matplotlib.figure.Figure.savefig = _refuse
    rundir.open = _open  # RunDir.log appends with the builtin open
