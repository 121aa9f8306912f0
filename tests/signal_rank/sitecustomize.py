"""Test instrument for tests/test_distributed.py, loaded only when this folder is on PYTHONPATH:
the process of rank TRAINER_TEST_SIGNAL_RANK sends itself SIGTERM at the start of training step
TRAINER_TEST_SIGNAL_STEP (counted from 1 over the whole process), as a job scheduler or a user
signalling one process would. Only the one process gets it; the others must stop with it."""

import os

_rank, _step = os.environ.get("TRAINER_TEST_SIGNAL_RANK"), int(os.environ.get("TRAINER_TEST_SIGNAL_STEP", "0") or 0)
if _rank is not None and _step > 0 and os.environ.get("RANK") == _rank:
    import signal

    from trainer import loop

    _one_batch, _count = loop.Learner._one_batch, [0]

    def _signalled_batch(self, xb, yb):
        _count[0] += 1
        if _count[0] == _step:
            os.kill(os.getpid(), signal.SIGTERM)
        _one_batch(self, xb, yb)

    loop.Learner._one_batch = _signalled_batch
