"""Device, seeds, AMP and thread settings: the facts of the machine a run is on."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def set_deterministic(on: bool) -> None:
    """deterministic: true picks deterministic kernels (cuDNN, cuBLAS, scatter/index ops), warning
    where an op has none; false (the default) lets cuDNN benchmark for speed. Always set both
    ways, so one run in a process cannot leave its setting to the next."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on and torch.cuda.is_available()


def rng_state() -> dict:
    """Every random state a resumed run needs to continue exactly (plain data and tensors)."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _np_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _py_state():
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


@dataclass(frozen=True)
class Precision:
    """One AMP path for every device: autocast and the gradient scaler take `enabled=` flags."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def pick_precision(amp: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA GPUs that support it, else fp16 on CUDA; fp32 on the CPU. bf16 autocast
    is slower than fp32 on CPUs without AMX / AVX512_BF16 and about 2x faster on CPUs with them
    (scripts/bench_cpu_step.py), but it rounds differently, so on the CPU it is opt-in (amp: bf16)."""
    kind = device.type
    if amp == "off" or (amp == "auto" and kind != "cuda"):
        return Precision(kind, None)
    if amp == "auto":
        return Precision(kind, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if amp == "fp16" and kind == "cpu":
        raise ValueError("amp: fp16 needs a CUDA GPU; use bf16 or off on the CPU")
    return Precision(kind, torch.bfloat16 if amp == "bf16" else torch.float16)


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
    model.compile(backend=backend, dynamic=False)
    return model
