"""What the figures were measured on: the machine, torch and the weights, found without importing torch here.

This process stays free of torch until the baseline runs (after every pipeline run): the torch
facts come from a short child process and the weights are checked from their headers, so the
daemon's RSS in the table is the daemon's, not a daemon plus a loaded torch.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from pipeline.tools.bench.errors import BenchError

_TORCH_PROBE = """
import json, sys, torch
from pipeline.common.devices import resolve_precision
device, precision = sys.argv[1], sys.argv[2]
resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(), "resolved_device": resolved,
                  "resolved_precision": resolve_precision(precision, torch.device(resolved)),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch_threads": torch.get_num_threads()}))
"""


def torch_facts(device: str, precision: str = "auto") -> dict[str, Any]:
    """torch version, GPU and the device `device` resolves to, asked of a child process (see the module docstring)."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", _TORCH_PROBE, device, precision], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise BenchError(f"cannot import torch: {lines[-1] if lines else 'exit code ' + str(result.returncode)}")
    facts = json.loads(result.stdout)
    if device.startswith("cuda") and not facts["cuda"]:
        raise BenchError(f"device {device!r} asked for, but CUDA is not available here")
    return facts


def check_weights(config: Any) -> dict[str, Any]:
    """Fail early, in one line, when a weights file is missing or unreadable (workers would only log it).

    Safetensors files are checked from their header (no torch here, see the module docstring);
    a torch checkpoint can only be checked by loading it, which the workers do.
    """
    from pipeline.models.card import WeightsError
    from pipeline.store.provenance import describe_models, missing_weights

    missing = missing_weights(config.models)
    if missing is not None:
        raise BenchError(missing)
    try:
        models = describe_models(config.models)
    except (WeightsError, OSError) as error:
        raise BenchError(str(error)) from None
    described: dict[str, Any] = {}
    for name in ("tlm", "sslm"):
        entry = models[name]
        if not entry["enabled"]:
            described[name] = {"enabled": False}
            continue
        card = entry.get("card")
        described[name] = {"enabled": True, "weights": entry["weights"], "sha256": entry["sha256"],
                           "card_min_size": None if card is None else card["min_size"]}
    return described


def machine_description(torch: dict[str, Any]) -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, memory, load, GPU, niceness (`torch`: `torch_facts`)."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        "gpu": torch["gpu"], "torch": torch["torch"], "torch_threads": torch["torch_threads"],
        "python": platform.python_version(), "platform": platform.platform(),
    }
