"""AMP: one precision path for every device (autocast and the gradient scaler take `enabled=` flags)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
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


def slow_here(precision: Precision) -> str | None:
    """A warning for bf16 autocast on a CPU without bf16 instructions, which emulates it: a bnresnet
    step took 1.9x its fp32 time on an Intel CPU with AVX512 alone, 23x on an AMD EPYC with AVX2,
    and 0.54x on one with AMX (scripts/bench_cpu_step.py, README: Speed)."""
    if precision.device_type != "cpu" or precision.dtype != torch.bfloat16:
        return None
    has = [getattr(torch.cpu, f"_is_{x}_supported", lambda: True)() for x in ("amx_tile", "avx512_bf16")]
    if any(has):
        return None
    return (
        "warning: amp: bf16 on a CPU without bf16 instructions (AMX, AVX512_BF16) runs slower than fp32 "
        "(the quickstart's bnresnet took 1.9x to 23x the fp32 step time on two such CPUs); "
        "python scripts/bench_cpu_step.py measures yours"
    )
