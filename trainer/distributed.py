"""Several processes training one model (DistributedDataParallel), started by torchrun or by
`trainer fit --devices N`: who this process is, and the few collective steps the run needs.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here does anything: a
single process is world size 1, rank 0, and every helper returns its input. Under torchrun
every process joins one process group (NCCL on CUDA, gloo on the CPU), even a single one, so
`torchrun --nproc_per_node=1` measures what DDP itself costs (scripts/ddp_overhead.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.models.layers import BnLayer

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow rank (checkpoint saves, decoding)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group is running (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def launched() -> bool:
    """torchrun (and `--devices`) set these for every process it starts."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def current() -> World:
    if not dist.is_available() or not dist.is_initialized():
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def backend_for(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def start(backend: str, device: torch.device) -> tuple[World, torch.device]:
    """Joins the process group when launched by torchrun; returns this process's world and the
    device it trains on (cuda:LOCAL_RANK on a GPU machine, one GPU per process)."""
    if not launched():
        return SINGLE, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this machine but "
                             f"only {torch.cuda.device_count()} GPU(s): start one process per GPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = backend_for(backend, device)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed.backend: nccl needs CUDA GPUs; use gloo (or auto) on the CPU")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return current(), device


def stop(wait: bool = True) -> None:
    """Closes the process group. wait: every rank ended the same way (finished, or stopped by a
    signal), so each waits here until rank 0 has written its last file before leaving. After an
    error on one rank there is no waiting: it exits, and the launcher stops the others."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            with contextlib.suppress(Exception):  # a rank that died already: nothing left to wait for
                dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def from_main(fn):
    """Runs fn on rank 0 only and gives its result to every rank; an error on rank 0 is raised on
    every rank (so no rank waits forever for a rank 0 that gave up)."""
    world = current()
    if not world.enabled:
        return fn()
    box = [None]
    if world.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised there
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        value.rank0_says = not world.is_main  # rank 0 prints it; the other ranks only exit alike
        raise value
    return value


@contextlib.contextmanager
def local_main_first():
    """The first process of each machine goes first (decoding images into the shared cache);
    the others then read what it wrote instead of doing the same work at the same time."""
    world = current()
    if world.enabled and world.local_rank != 0:
        dist.barrier()
    yield
    if world.enabled and world.local_rank == 0:
        dist.barrier()


def _device() -> torch.device:
    """Collectives of NCCL run on this process's GPU, gloo's on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(value: float) -> float:
    """The average over ranks of one number (the loss of this step)."""
    if not current().enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def largest(value: int) -> int:
    """The largest value over ranks (a signal any rank received)."""
    if not current().enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    world = current()
    if not world.enabled:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_outputs(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation outputs and targets of every rank's shard, joined: metrics over the whole set."""
    parts = gather((out, y))
    return torch.cat([o for o, _ in parts]), torch.cat([t for _, t in parts])


def rank_states(key: str, state) -> dict:
    """For a checkpoint: every rank's copy of a state that differs between ranks (random states:
    each rank draws its own dropout masks; a language model's hidden state: each rank has its own
    streams), so that each rank continues its own on resume. Empty for a single process."""
    if not current().enabled:
        return {}
    return {key: gather(state)}


def own_state(checkpoint_state: dict, key: str, default):
    """This rank's copy from a checkpoint when it was written by as many ranks, else `default`
    (rank 0's, for a run resumed with another number of processes)."""
    world, per_rank = current(), checkpoint_state.get(key)
    if per_rank is not None and len(per_rank) == world.world_size:
        return per_rank[world.rank]
    return default


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the model as this stage trains it: DDP only syncs the parameters that need a
    gradient when it is built, so each stage (a new freeze state) wraps the model again."""
    if not current().enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)  # buffers: rank 0's, sent each forward


def use_sync_bn(on: bool, built, device: torch.device) -> int | None:
    """train.sync_bn under DDP (a single process has the whole batch already): how many layers
    now share their statistics, or None when nothing was to be done. torch's SyncBatchNorm needs
    CUDA; the course's BnLayer syncs over any backend, gloo on the CPU included."""
    world = current()
    if not on or not world.enabled:
        return None
    if device.type != "cuda":
        if world.world_size == 1:
            return None
        torch_norms = [m for m in built.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if torch_norms:
            raise ValueError(f"train.sync_bn needs CUDA GPUs for this model's {len(torch_norms)} torch BatchNorm "
                             "layer(s) (torch's SyncBatchNorm does not run on the CPU); set it to false for CPU "
                             "processes, or use a course model (bnresnet, bnconvnet) whose BnLayer syncs over gloo")
    return convert_sync_bn(built)


def convert_sync_bn(built) -> int:
    """Every BatchNorm becomes a SyncBatchNorm (nn.SyncBatchNorm.convert_sync_batchnorm, which
    keeps the same parameters and buffers, so checkpoints keep their keys). Replaced in place
    wherever the model, its layer groups and its split hold it, so freezing still finds them.
    The course's BnLayers are switched to syncing in place."""
    new: dict[int, nn.Module] = {}
    course = [m for m in built.model.modules() if isinstance(m, BnLayer)]
    for layer in course:
        layer.sync = True

    def converted(bn: nn.Module) -> nn.Module:
        if id(bn) not in new:
            new[id(bn)] = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
        return new[id(bn)]

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(module, name, converted(child))
            else:
                walk(child)

    holders = [built.model, *built.groups, *(m for m in built.extra.values() if isinstance(m, nn.Module))]
    for m in holders:
        walk(m)
    built.groups = [converted(g) if isinstance(g, nn.modules.batchnorm._BatchNorm) else g for g in built.groups]
    return len(new) + len(course)
