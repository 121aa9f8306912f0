"""Device, threads, deterministic kernels and torch.compile: the facts of the machine a run is on."""

from __future__ import annotations

import logging
import os

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but no CUDA GPU is available")  # the CLI exits 2
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: mps was asked for, but this machine has no Apple GPU")
    return torch.device(name)


def cpu_budget() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup quota (containers
    often see the host's cores but get only a share of them)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads() -> int:
    """Intra-op threads: torch picks the host's physical cores, which oversubscribes a container
    limited to fewer (every op then waits on descheduled threads). Never more than the budget;
    OMP_NUM_THREADS, when set, wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        n = min(torch.get_num_threads(), cpu_budget())
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
    return torch.get_num_threads()


def set_deterministic(on: bool) -> None:
    """deterministic: true picks deterministic kernels (cuDNN, cuBLAS, scatter/index ops), warning
    where an op has none; false (the default) lets cuDNN benchmark for speed. Always set both
    ways, so one run in a process cannot leave its setting to the next."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on and torch.cuda.is_available()


RECOMPILE_LIMIT = 64  # graphs per forward: (image size, batch size, train/eval) combinations


def compile_ready(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None when it can): inductor builds C++ on the CPU."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler found (inductor needs one on the CPU)"
    return None


def compile_model(model: torch.nn.Module, backend="inductor") -> torch.nn.Module:
    """compile: true. In place (nn.Module.compile), so state_dict keys, checkpoints and layer
    groups are untouched. dynamic=False: one specialised graph per input shape and mode, i.e. one
    compile per (image size, batch size, train/eval): progressive resizing costs one recompile
    per new size, a last short validation batch one more, and steps at a size already seen
    reuse their graph. Dynamo's default limit (8 graphs per function, then eager) is raised so
    that several stages of resizing stay compiled."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    cpp = logging.getLogger("torch.utils.cpp_extension")
    if not torch.cuda.is_available() and not any(isinstance(f, _NoCudaRuntimeNote) for f in cpp.filters):
        cpp.addFilter(_NoCudaRuntimeNote())  # a CUDA toolkit on a machine without a GPU is no news to the user
    model.compile(backend=backend, dynamic=False)
    return model


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's 'No CUDA runtime is found, using CUDA_HOME=...' (inductor on a CPU machine)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()
