"""Character-level language models (fast.ai lesson 6): embedding -> recurrent core -> linear.

Inputs are (seq, bs) character ids, outputs (seq, bs, vocab) logits. The models are stateful:
the hidden state left by one batch starts the next (each of the bs streams continues where it
stopped), detached so backpropagation stays within a batch. `reset()` forgets it; the loop's
ResetState callback calls it at the start of every epoch and before validation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.registry import MODELS, Built


class RNNCellLoop(nn.Module):
    """The lesson's loop over nn.RNNCell, with nn.RNN's interface: (x, h) -> (outputs, h)."""

    def __init__(self, n_in: int, n_hidden: int):
        super().__init__()
        self.n_hidden = n_hidden
        self.cell = nn.RNNCell(n_in, n_hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):
        h = x.new_zeros(x.shape[1], self.n_hidden) if h is None else h[0]
        outs = []
        for xt in x:
            h = self.cell(xt, h)
            outs.append(h)
        return torch.stack(outs), h.unsqueeze(0)


def _detach(h):
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


def _batch_size(h) -> int:
    return (h[0] if isinstance(h, tuple) else h).shape[1]


class CharModel(nn.Module):
    def __init__(self, vocab: int, n_fac: int, n_hidden: int, core: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, n_fac)
        self.core = core
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(n_hidden, vocab)
        self.h = None  # a plain attribute, not a buffer: checkpoints hold weights, not a stream's state

    def reset(self) -> None:
        self.h = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h if self.h is not None and _batch_size(self.h) == x.shape[1] else None
        out, h = self.core(self.emb(x), h)
        self.h = _detach(h)
        return self.out(self.drop(out))


def _built(model: CharModel) -> Built:
    # layer groups for differential lrs and freezing: embedding, recurrent core, decoder
    return Built(model, [model.emb, model.core, nn.Sequential(model.drop, model.out)])


@MODELS.register("charrnn")
def charrnn(n_out: int, n_fac: int = 42, n_hidden: int = 256, **_) -> Built:
    """nn.RNNCell unrolled by hand over the sequence (the lesson's CharSeqStatefulRnn2)."""
    return _built(CharModel(n_out, n_fac, n_hidden, RNNCellLoop(n_fac, n_hidden)))


def _stacked(kind, n_out: int, n_fac: int, n_hidden: int, n_layers: int, dropout: float) -> Built:
    """dropout acts between stacked layers (torch's); a single layer gets it on its output
    instead, so the option is never silently ignored."""
    between = dropout if n_layers > 1 else 0.0
    core = kind(n_fac, n_hidden, n_layers, dropout=between)
    return _built(CharModel(n_out, n_fac, n_hidden, core, dropout - between))


@MODELS.register("gru")
def gru(n_out: int, n_fac: int = 42, n_hidden: int = 256, n_layers: int = 1, dropout: float = 0.0, **_) -> Built:
    return _stacked(nn.GRU, n_out, n_fac, n_hidden, n_layers, dropout)


@MODELS.register("lstm")
def lstm(n_out: int, n_fac: int = 42, n_hidden: int = 512, n_layers: int = 2, dropout: float = 0.0, **_) -> Built:
    return _stacked(nn.LSTM, n_out, n_fac, n_hidden, n_layers, dropout)
