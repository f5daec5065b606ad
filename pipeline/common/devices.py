"""Which torch device and precision a model runs on: `auto` resolved the same way everywhere.

Workers, training, evaluation and the benchmark all take a device name from the user (`auto`,
`cpu`, `cuda`, `cuda:N`) and a precision (`auto`, `float32`, `bfloat16`). torch is imported
inside the functions: the daemon imports this module's callers without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

Precision = Literal["float32", "bfloat16"]


class DeviceError(PipelineError, ValueError):
    """A device asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU; `cpu`, `cuda`, `cuda:N` as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r}: not a device name (auto, cpu, cuda or cuda:N)") from None


def has_native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 arithmetic is native here (else autocast would emulate it, slower than float32)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bfloat16()


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU does bfloat16 natively (AVX-512 BF16 or AMX); asks no torch, so torch-free workers can ask too."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """`auto` -> bfloat16 on CPUs where it is native, else float32; the others as given.

    Not on GPUs: these models are small, and on an H200 bfloat16 autocast made them slower
    (TLM 21 ms vs 9.4 ms per frame in `pipeline bench`; its casts cost more than the tensor cores save).
    """
    if precision == "auto":
        return "bfloat16" if device.type == "cpu" and has_native_bfloat16(device) else "float32"
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, not {precision!r}")
    return precision  # type: ignore[return-value]
