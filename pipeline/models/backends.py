"""Which backend runs the models on a device: `build_predictor`, what a worker calls to get its FramePredictor.

`models.backend`:
- `torch`: `pipeline.models.joint.JointPredictor`, the reference, on any device.
- `onnxruntime`: `pipeline.models.onnx_predictor.OnnxJointPredictor`, CPU only. A cuda device with it is refused
  with one line (the onnxruntime CPU wheel has no CUDA provider, and on a GPU torch's batched path is the fast one);
  so is `precision: bfloat16` (ONNX Runtime runs the graphs in float32), and so is onnxruntime not installed.
- `models.sslm.int8`: the SSLM's int8 graph (`pipeline.models.onnx_quantize`), onnxruntime only: where torch is
  chosen (forced, or by `auto` on a GPU or with bfloat16) it is refused with one line.
- `auto`: onnxruntime where the frames run on the CPU (device `cpu`, or `auto` on a machine without a CUDA GPU),
  onnxruntime is installed and precision comes out float32 (`auto` is bfloat16 only on CPUs with native bfloat16,
  where torch's bfloat16 is the faster one); torch everywhere else (GPUs).

The onnxruntime path imports no torch, here or below: whether there is a CUDA GPU is asked of the driver
(`libcuda`), not of torch, and a graph missing from the ONNX cache is exported by a child process
(`python -m pipeline.models.onnx_export`; `onnx_predictor.export_in_child`), so only that child loads torch, once
per weights file and settings. The torch path imports torch as it always did.
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import TYPE_CHECKING, Literal

from pipeline.common.devices import cpu_has_native_bfloat16
from pipeline.models.card import WeightsError

if TYPE_CHECKING:
    from pipeline.config import ModelSettings
    from pipeline.models.prediction import FramePredictor

Backend = Literal["torch", "onnxruntime"]


class BackendError(WeightsError):
    """A backend that cannot run here (not installed, or not on this device); the message is one line."""


def onnxruntime_installed() -> bool:
    """Whether `import onnxruntime` would work (found without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def cuda_device_count() -> int:
    """CUDA GPUs the driver shows this process (CUDA_VISIBLE_DEVICES respected), asked of libcuda without torch; 0 on error."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return int(count.value)


def _on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and cuda_device_count() == 0)


def choose_backend(settings: ModelSettings, device: str) -> Backend:
    """The backend `build_predictor` uses for `settings` on `device` (see the module docstring); one-line BackendError."""
    backend = _choose_backend(settings, device)
    if backend == "torch" and settings.sslm.enabled and settings.sslm.int8:
        raise BackendError(f"models.sslm.int8 runs on the onnxruntime backend only, and models.backend {settings.backend} "
                           f"chose torch on device {device!r} (a GPU, or bfloat16): set models.sslm.int8 false, or run "
                           "on a CPU with models.backend onnxruntime")
    return backend


def _choose_backend(settings: ModelSettings, device: str) -> Backend:
    if settings.backend == "torch":
        return "torch"
    if settings.backend == "onnxruntime":
        if not _on_cpu(device):
            raise BackendError(f"models.backend onnxruntime runs on the CPU only, not on device {device!r}: "
                               "use backend torch or auto there")
        if settings.precision == "bfloat16":
            raise BackendError("models.backend onnxruntime runs float32: models.precision bfloat16 needs backend torch")
        if not onnxruntime_installed():
            raise BackendError("models.backend onnxruntime: the onnxruntime package is not installed "
                               "(pip install onnxruntime, or set models.backend to torch or auto)")
        return "onnxruntime"
    bfloat16 = settings.precision == "bfloat16" or (settings.precision == "auto" and cpu_has_native_bfloat16())
    return "onnxruntime" if onnxruntime_installed() and not bfloat16 and _on_cpu(device) else "torch"


def build_predictor(settings: ModelSettings, device: str = "auto", threads: int = 0) -> FramePredictor:
    """The FramePredictor for `settings` on `device` (auto, cpu, cuda, cuda:N), `threads` CPU threads (0: the library's default).

    torch's thread count is set here too (`torch.set_num_threads`) when torch is chosen and threads > 0. A bad
    weights file, a backend that cannot run here or a failed export raises one line (WeightsError/BackendError).
    """
    if choose_backend(settings, device) == "onnxruntime":
        from pipeline.models.onnx_predictor import OnnxJointPredictor

        return OnnxJointPredictor(settings, threads=threads)
    import torch

    from pipeline.models.joint import JointPredictor

    if threads:
        torch.set_num_threads(threads)
    return JointPredictor.from_settings(settings, device=device)
