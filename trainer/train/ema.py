"""train.ema: an exponential moving average of the weights, the model people evaluate.

Every optimizer step moves the average towards the current weights by (1 - decay) (torch's own
`get_ema_multi_avg_fn`, one foreach lerp over all tensors). Validation, checkpoints and the
stage's result use the average; training goes on from the raw weights. BatchNorm's running
statistics are averaged with the weights (as timm's ModelEma does), so the averaged model needs
no extra pass over the data.

How the two sets of weights take turns in the one model (no second copy of the network runs):
before validation the raw weights are put aside and the average copied in; the epoch's
checkpoints then hold the average as "model" (what predict and export load) and the raw weights
in this callback's state (what resume continues from); the next epoch copies the raw weights
back. At the end of the stage the average stays: the next stage starts from it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from trainer.train.loop import Callback, Learner


class WeightAverage(Callback):
    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.update = get_ema_multi_avg_fn(decay)
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._bind()
        self.raw: dict[str, torch.Tensor] | None = None  # set aside while the average is in the model
        self.loaded = False

    def _bind(self) -> None:
        """The model's own tensors (shared storage, updated in place), paired once with the
        average's into what is averaged and the counters (num_batches_tracked), so that a step
        is two foreach calls over ready lists."""
        self.live = self.model.state_dict()
        floats = [k for k, v in self.live.items() if v.is_floating_point()]
        counters = [k for k in self.live if k not in floats]
        self._avg_floats, self._live_floats = [self.avg[k] for k in floats], [self.live[k] for k in floats]
        self._avg_counts, self._live_counts = [self.avg[k] for k in counters], [self.live[k] for k in counters]

    def before_fit(self, learn: Learner) -> None:
        self._bind()  # the tensors as training will see them
        if not self.loaded:  # a resumed stage continues its average; a new one starts from its weights
            self._copy(self.live, self.avg)

    def before_epoch(self, learn: Learner) -> None:
        if self.raw is not None:  # the last validation's swap: training goes on from the raw weights
            self._copy(self.raw, self.live)
            self.raw = None

    def after_batch(self, learn: Learner) -> None:
        with torch.no_grad():
            self.update(self._avg_floats, self._live_floats, None)
            if self._avg_counts:  # counts are not averaged: they follow the model
                torch._foreach_copy_(self._avg_counts, self._live_counts)

    def before_validate(self, learn: Learner) -> None:
        self.raw = {k: v.detach().clone() for k, v in self.live.items()}
        self._copy(self.avg, self.live)

    def after_fit(self, learn: Learner) -> None:
        self._copy(self.avg, self.live)  # the stage's result is the average
        self.raw = None

    @staticmethod
    @torch.no_grad()
    def _copy(src: dict, dst: dict) -> None:
        for k, v in dst.items():
            v.copy_(src[k])

    def state_dict(self) -> dict:
        raw = self.raw if self.raw is not None else self.live
        return {
            "decay": self.decay,
            "avg": {k: v.detach().clone() for k, v in self.avg.items()},
            "raw": {k: v.detach().clone() for k, v in raw.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """After the checkpoint's "model" was loaded: the training weights go back in."""
        self._bind()
        self._copy(state["avg"], self.avg)
        self._copy(state["raw"], self.live)
        self.raw, self.loaded = None, True
