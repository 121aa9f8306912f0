"""Joining and leaving the process group of a run started by torchrun (or `trainer fit
--devices N`, which is torchrun): who this process is comes out as a World (trainer/train/world.py).

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here does anything: a
single process is world size 1, rank 0. Under torchrun every process joins one process group
(NCCL on CUDA, gloo on the CPU), even a single one, so `torchrun --nproc_per_node=1` measures
what DDP itself costs (scripts/ddp_overhead.py).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.train.world import SINGLE, World

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow rank (checkpoint saves, decoding)


def launched() -> bool:
    """torchrun (and `--devices`) set these for every process it starts."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


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
            raise ValueError(
                f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this machine but "
                f"only {torch.cuda.device_count()} GPU(s): start one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = backend_for(backend, device)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed.backend: nccl needs CUDA GPUs; use gloo (or auto) on the CPU")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, True), device


def stop(wait: bool = True) -> None:
    """Closes the process group. wait: every rank ended the same way (finished, or stopped by a
    signal), so each waits here until rank 0 has written its last file before leaving. After an
    error on one rank there is no waiting: it exits, and the launcher stops the others."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            with contextlib.suppress(Exception):  # a rank that died already: nothing left to wait for
                dist.barrier()
        dist.destroy_process_group()
