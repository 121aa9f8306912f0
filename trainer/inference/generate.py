"""Text generation from a finished language-model run.

The prime goes through the model once; after that each new character is fed alone while the
model keeps its hidden state, so the work is linear in the number of characters generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from trainer import storage
from trainer.config import Config
from trainer.data.text import Vocab
from trainer.inference.finished import find_checkpoint, read_json, read_run_config
from trainer.models import create_model
from trainer.models.weights import load_weights
from trainer.run.runtime import pick_device


@dataclass
class TextRun:
    path: Path
    cfg: Config
    model: torch.nn.Module
    vocab: Vocab
    device: torch.device


class VocabFile(BaseModel):
    itos: list[str] = Field(min_length=2)


def load_text_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> TextRun:
    path = Path(run_dir)
    cfg = read_run_config(path)
    if cfg.data.layout != "text":
        raise ValueError(
            f"{path}: an image run; `trainer generate` needs a language-model run (use `trainer predict` for images)"
        )
    vocab = Vocab.from_json(read_json(path / "vocab.json", VocabFile).model_dump())
    built = create_model(cfg.model, len(vocab), 0, 0)
    ckpt = find_checkpoint(path, which)
    load_weights(built.model, storage.model_state(ckpt), ckpt)
    dev = pick_device(device)
    built.model.to(dev).eval()
    return TextRun(path, cfg, built.model, vocab, dev)


def next_char(logits: torch.Tensor, temperature: float, g: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature). Never UNK."""
    logits = logits.float().clone()
    logits[0] = -torch.inf
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=g))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    vocab: Vocab,
    prime: str,
    n_chars: int,
    temperature: float = 0.8,
    seed: int | None = None,
    device: torch.device = torch.device("cpu"),
) -> str:
    """The prime followed by n_chars generated characters."""
    if not prime:
        raise ValueError("--prime must have at least one character to start from")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"--temperature {temperature}: must be 0 (greedy) or a finite positive number")
    g = torch.Generator()
    g.manual_seed(seed) if seed is not None else g.seed()
    model.eval()
    model.reset()
    x = vocab.encode(prime).view(-1, 1).to(device)  # (seq, bs=1)
    out = []
    for _ in range(n_chars):
        logits = model(x)[-1, 0]
        c = next_char(logits, temperature, g)
        out.append(c)
        x = torch.tensor([[c]], device=device)
    return prime + vocab.decode(out)
