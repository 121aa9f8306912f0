"""Text for character-level language models (fast.ai lesson 6, fastai's LanguageModelLoader).

The vocabulary comes from the training text; index 0 is the unknown token, so a character
never seen in training (in the validation text, or a generation prime) maps to it instead of
crashing. The text is cut into `bs` parallel streams laid out (steps, bs): batch k is rows
[b_k, b_{k+1}) as input and the same rows shifted by one as target, so the hidden state of
stream j at the end of batch k is exactly the state batch k+1 needs.

Training sequence lengths vary as in fastai: bptt with probability 0.95, else bptt/2, then
normal around that with deviation 5, at least 5. The lengths of an epoch are drawn from a
generator seeded with (seed, epoch), then rescaled by a few percent so that every epoch has the
same number of batches and covers every stream exactly once: the schedule needs a fixed epoch
length and a resumed run must see the batches the interrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from trainer.config.data_schema import TextData
from trainer.config.schema import Config
from trainer.data.items import DataError

UNK = "<unk>"


@dataclass(frozen=True)
class Vocab:
    itos: tuple[str, ...]  # itos[0] is UNK, then the training text's characters, sorted

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls((UNK, *sorted(set(text))))

    @classmethod
    def from_json(cls, data: dict) -> Vocab:
        itos = tuple(data["itos"])
        if not itos or itos[0] != UNK:
            raise ValueError(f"vocab.json: the first entry must be the unknown token {UNK!r}")
        return cls(itos)

    def to_json(self) -> dict:
        return {"itos": list(self.itos), "unk": 0}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        """Character ids (int64); characters not in the vocabulary become 0 (UNK)."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        known = np.array([ord(c) for c in self.itos[1:]], dtype=np.uint32)  # sorted, as itos
        if len(codes) == 0 or len(known) == 0:
            return torch.zeros(len(codes), dtype=torch.long)
        pos = np.minimum(np.searchsorted(known, codes), len(known) - 1)
        ids = np.where(known[pos] == codes, pos + 1, 0)
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        return "".join("\ufffd" if i == 0 else self.itos[i] for i in ids)


def read_text(path: str | Path, key: str = "data.path", min_chars: int = 2) -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped), or a DataError saying what is
    wrong: missing, not a file, not UTF-8, binary, empty, or shorter than min_chars. The one
    reader of a corpus: training, `trainer summary` and the vocabulary all see the same text."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {key} should name a UTF-8 text file ({'a folder' if p.is_dir() else 'not found'})")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}"
        ) from None
    if "\x00" in text:
        raise DataError(f"{p}: looks binary (NUL bytes at offset {text.index(chr(0))}), not a text corpus")
    if not text.strip():
        raise DataError(f"{p}: the text corpus is empty")
    if len(text) < min_chars:
        raise DataError(f"{p}: the text corpus has {len(text)} characters; it needs at least {min_chars}")
    return text


def split_text(data: TextData) -> tuple[str, str]:
    """Training and validation text: a separate file, or the last valid_pct of one file."""
    text = read_text(data.path, "data.path", min_chars=data.bptt + 1)
    if data.valid_path:
        return text, read_text(data.valid_path, "data.valid_path", min_chars=data.bptt + 1)
    cut = int(len(text) * (1 - data.valid_pct))
    if cut < 1 or cut >= len(text):
        raise DataError(f"{data.path}: {len(text)} characters are too few to split by valid_pct {data.valid_pct}")
    return text[:cut], text[cut:]


def streams(ids: torch.Tensor, bs: int) -> torch.Tensor:
    """(steps, bs): column j is the j-th contiguous slice of the text (the tail is dropped)."""
    n = len(ids) // bs
    return ids[: n * bs].view(bs, n).t().contiguous()


def draw_lengths(rng: np.random.Generator, bptt: int, n: int) -> np.ndarray:
    """fastai's sequence lengths: bptt (p=0.95) or bptt/2, then normal(., 5), at least 5."""
    base = np.where(rng.random(n) < 0.95, bptt, bptt / 2)
    return np.maximum(5, rng.normal(base, 5).astype(np.int64))


@cache
def mean_length(bptt: int) -> float:
    return float(draw_lengths(np.random.default_rng(0), bptt, 20_000).mean())


def epoch_bounds(n_steps: int, bptt: int, n_batches: int, seed: int, epoch: int) -> np.ndarray:
    """n_batches + 1 increasing offsets from 0 to n_steps; a function of (seed, epoch) alone."""
    rng = np.random.default_rng([seed % 2**32, epoch, 5])
    edges = np.cumsum(draw_lengths(rng, bptt, n_batches)).astype(np.float64)
    bounds = np.concatenate([[0], np.round(edges * n_steps / edges[-1])]).astype(np.int64)
    if np.any(np.diff(bounds) < 1):  # a text barely longer than one batch: split evenly
        bounds = np.linspace(0, n_steps, n_batches + 1).round().astype(np.int64)
    return bounds


@dataclass
class TextStreams:
    """Batches (x, y) of shape (seq, bs): y is x one character later. Training draws variable
    lengths per (seed, epoch); validation uses fixed bptt (the last batch may be shorter)."""

    data: torch.Tensor  # (steps, bs) int64, on the device
    bptt: int
    seed: int = 0
    variable: bool = False
    epoch: int = 0
    limit: int | None = None  # at most this many batches (smoke runs)

    def __post_init__(self):
        self.n_steps = len(self.data) - 1
        if self.variable:
            self.n_batches = max(1, min(self.n_steps, round(self.n_steps / mean_length(self.bptt))))
        else:
            self.n_batches = math.ceil(self.n_steps / self.bptt)

    @property
    def bs(self) -> int:
        return self.data.shape[1]

    def __len__(self) -> int:
        return min(self.n_batches, self.limit) if self.limit is not None else self.n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bounds(self) -> np.ndarray:
        if self.variable:
            return epoch_bounds(self.n_steps, self.bptt, self.n_batches, self.seed, self.epoch)
        return np.minimum(np.arange(self.n_batches + 1) * self.bptt, self.n_steps)

    def iterate(self, start: int = 0):
        """Yields (batch index, x, y) from batch `start` on (resume skips what was done)."""
        b = self.bounds().tolist()
        for i in range(start, len(self)):
            lo, hi = b[i], b[i + 1]
            yield i, self.data[lo:hi], self.data[lo + 1 : hi + 1]

    def __iter__(self):
        for _, x, y in self.iterate():
            yield x, y


@dataclass
class TextBundle:
    vocab: Vocab
    train_ids: torch.Tensor
    valid_ids: torch.Tensor
    bptt: int
    seed: int
    device: torch.device
    smoke: bool = False
    log: Callable[[str], None] = print

    task_kind = "language_model"
    in_channels = 0  # unused by the char models

    @property
    def n_out(self) -> int:
        return len(self.vocab)

    def _streams(self, ids: torch.Tensor, bs: int, what: str) -> torch.Tensor:
        if len(ids) // bs < 2:
            if not self.smoke:
                raise DataError(
                    f"the {what} text has {len(ids)} characters: too few for {bs} streams of at least 2; lower data.bs"
                )
            bs = max(1, len(ids) // 2)  # a tiny CI text still exercises the whole pipeline
            self.log(f"smoke: the {what} text is short; {bs} streams")
        if len(ids) < 2:
            raise DataError(f"the {what} text has {len(ids)} character(s); at least 2 are needed")
        return streams(ids, bs).to(self.device)

    def loaders(self, bs: int, size: int | None = None) -> tuple[TextStreams, TextStreams]:
        train = TextStreams(self._streams(self.train_ids, bs, "training"), self.bptt, self.seed, variable=True)
        valid = TextStreams(self._streams(self.valid_ids, bs, "validation"), self.bptt, self.seed)
        return train, valid

    def files_to_save(self) -> dict:
        return {"vocab.json": self.vocab.to_json()}


def build_text_bundle(cfg: Config, seed: int, device: torch.device, smoke: bool = False, log=print) -> TextBundle:
    data = cfg.data
    train, valid = split_text(data)
    vocab = Vocab.from_text(train)
    train_ids, valid_ids = vocab.encode(train), vocab.encode(valid)
    unseen = int((valid_ids == 0).sum())
    log(
        f"text: {len(train_ids):,} training and {len(valid_ids):,} validation characters, vocabulary "
        f"{len(vocab)} (with the unknown token)"
        + (f"; {unseen} validation characters unseen in training" if unseen else "")
    )
    return TextBundle(vocab, train_ids, valid_ids, data.bptt, seed, device, smoke, log)


def vocab_size(cfg: Config) -> int:
    """The size of the vocabulary a run of this config would build (for `trainer summary`)."""
    return len(Vocab.from_text(split_text(cfg.data)[0]))
