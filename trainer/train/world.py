"""This process among the processes training one model, and the few collective steps a run
needs. One World object is made when the run starts (trainer/run/distributed.py joins the
process group) and passed to whatever needs it; nothing here asks torch.distributed who we are.

A single process is SINGLE: rank 0 of 1, and every collective returns its input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group is running (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_main(self, fn):
        """Runs fn on rank 0 only and gives its result to every rank; an error on rank 0 is raised
        on every rank (so no rank waits forever for a rank 0 that gave up)."""
        if not self.enabled:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - handed to every rank, then raised there
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            value.rank0_says = not self.is_main  # rank 0 prints it; the other ranks only exit alike
            raise value
        return value

    @contextlib.contextmanager
    def local_main_first(self):
        """The first process of each machine goes first (decoding images into the shared cache);
        the others then read what it wrote instead of doing the same work at the same time."""
        if self.enabled and self.local_rank != 0:
            dist.barrier()
        yield
        if self.enabled and self.local_rank == 0:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The average over ranks of one number (the loss of this step)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.item() / self.world_size

    def largest(self, value: int) -> int:
        """The largest value over ranks (a signal any rank received)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_outputs(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation outputs and targets of every rank's shard, joined: metrics over the whole set."""
        parts = self.gather((out, y))
        return torch.cat([o for o, _ in parts]), torch.cat([t for _, t in parts])

    def per_rank(self, key: str, state) -> dict:
        """For a checkpoint: every rank's copy of a state that differs between ranks (random states:
        each rank draws its own dropout masks; a language model's hidden state: each rank has its
        own streams), so that each rank continues its own on resume. Empty for a single process."""
        return {key: self.gather(state)} if self.enabled else {}

    def own(self, checkpoint: dict, key: str, default):
        """This rank's copy from a checkpoint written by as many ranks, else `default` (rank 0's,
        for a run resumed with another number of processes)."""
        copies = checkpoint.get(key)
        if copies is not None and len(copies) == self.world_size:
            return copies[self.rank]
        return default

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)


SINGLE = World()


def _collective_device() -> torch.device:
    """Collectives of NCCL run on this process's GPU, gloo's on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
