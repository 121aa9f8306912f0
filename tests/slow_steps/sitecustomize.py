"""Test instrument for the kill tests (tests/test_kill.py), loaded only when this folder is on
PYTHONPATH: every training step of `python -m trainer fit` sleeps TRAINER_TEST_STEP_SECONDS
first, so a test can kill the process mid-epoch without racing it. Sleeping draws no random
numbers and changes no state, so the results are those of an unslowed run."""

import os

_delay = float(os.environ.get("TRAINER_TEST_STEP_SECONDS", "0") or 0)
if _delay > 0:
    import time

    from trainer.train import loop

    _one_batch = loop.Learner._one_batch

    def _slow_batch(self, xb, yb):
        time.sleep(_delay)
        _one_batch(self, xb, yb)

    loop.Learner._one_batch = _slow_batch
