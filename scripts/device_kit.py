"""Ready this checkout for a lent GPU machine, so that `scripts/gpu_bench.sh` runs there on the first try.

Why: a device run sends the working tree and what it carries, 64 MiB at most, to a machine that reaches no package
index. Its image has torch, torchvision, numpy, h5py, tensorstore, onnxruntime and most of what this project needs,
but not zarr, pyzmq, pydantic, hdfmap, watchdog, starlette or uvicorn; and the shipped TLM weights alone are 81 MB.
So, in three steps:

  here, before:   python scripts/device_kit.py prepare
      wheels of the missing packages (Python 3.12, manylinux) into .device-kit/wheels; the TLM weights as float16
      into .device-kit (41 MB); weights/tlm.safetensors taken out of the working tree (git still has it). Prints
      the size that will travel and the device command.
  on the device:  the printed command, with carry [".device-kit"]: installs the wheels into /tmp/site, writes
      weights/tlm.safetensors back as float32 from the float16 copy (`expand`), runs scripts/gpu_bench.sh; its
      printed tables come back in $OUT/gpu_bench.log, its JSON and configs in $OUT/figures.tgz.
  here, after:    python scripts/device_kit.py restore   (git checkout weights/tlm.safetensors)

The figures from the device are speed, not accuracy: weights rounded to float16 have the same shapes, so the same
work per frame, and change the masks by a little. hdf5plugin (46 MB, a dependency of hdfmap that hdfmap only
warns without) is left out: the simulated scans are gzip-compressed, which h5py reads itself.

`expand` needs numpy and safetensors only (no torch); `prepare` needs pip and git here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".device-kit"
WEIGHTS = REPO / "weights" / "tlm.safetensors"
HALF_WEIGHTS = KIT / "tlm-float16.safetensors"
LIMIT_BYTES = 64 * 2**20  # what a device run sends at most: the working tree and the carried paths together
# Not on the GPU image (its package list: /work/.library/device/KINDS.md), at the versions CI installs and tests with.
WHEELS = ("hdfmap==1.4.0", "asteval==1.0.10", "zarr==3.1.6", "donfig==0.8.1.post1", "google-crc32c==1.9.0",
          "numcodecs==0.16.6", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "typing_extensions==4.16.0", "pyzmq==27.3.0", "watchdog==7.1.1",
          "starlette==1.10.0", "uvicorn==0.55.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
DEVICE_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
                  ".device-kit/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHON=python3 && "
                  "python3 scripts/device_kit.py expand && (set -o pipefail; "
                  "timeout 560 bash scripts/gpu_bench.sh /tmp/figures 2>&1 | tee $OUT/gpu_bench.log); "
                  "tar czf $OUT/figures.tgz -C /tmp figures")  # one file: at most 8 come back from $OUT


def convert(source: Path, target: Path, dtype: str) -> None:
    """Every floating-point tensor of a .safetensors file in `dtype` ("float16" or "float32"), the metadata (the
    model card) kept."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(source), framework="numpy") as weights:
        metadata = weights.metadata()
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118  (a safe_open has no __iter__)
    tensors = {name: tensor.astype(dtype) if np.issubdtype(tensor.dtype, np.floating) else tensor
               for name, tensor in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)


def travelling_bytes() -> int:
    """What a device run would send: the files git tracks or does not ignore, as they are on the disk, and the kit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    files = [REPO / name.decode() for name in listed if name]
    kit = [path for path in KIT.rglob("*") if path.is_file()] if KIT.exists() else []
    return sum(path.stat().st_size for path in files + kit if path.is_file())


def prepare() -> int:
    wheels = KIT / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
               "-d", str(wheels), *WHEELS]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"device_kit: pip download failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    if WEIGHTS.exists():
        convert(WEIGHTS, HALF_WEIGHTS, "float16")
        WEIGHTS.unlink()  # git restores it: `python scripts/device_kit.py restore`
    if not HALF_WEIGHTS.exists():
        print(f"device_kit: no {WEIGHTS} and no {HALF_WEIGHTS}: run `restore` first", file=sys.stderr)
        return 1
    size = travelling_bytes()
    print(json.dumps({"wheels": sorted(path.name for path in wheels.glob("*.whl")), "travels_mib": round(size / 2**20, 1),
                      "limit_mib": LIMIT_BYTES // 2**20}, indent=1))
    if size > LIMIT_BYTES:
        print("device_kit: more than a device run sends: leave out what is not needed", file=sys.stderr)
        return 1
    print(f"device run: command={DEVICE_COMMAND!r}, carry=['.device-kit'], timeout_s=600")
    print("afterwards: python scripts/device_kit.py restore")
    return 0


def expand() -> int:
    if not HALF_WEIGHTS.exists():
        print(f"device_kit: {HALF_WEIGHTS} missing: was .device-kit carried?", file=sys.stderr)
        return 1
    convert(HALF_WEIGHTS, WEIGHTS, "float32")
    print(f"device_kit: {WEIGHTS} written as float32 from {HALF_WEIGHTS.name}")
    return 0


def restore() -> int:
    subprocess.run(["git", "checkout", "--", str(WEIGHTS.relative_to(REPO))], cwd=REPO, check=True)
    print(f"device_kit: {WEIGHTS} restored from git")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "expand", "restore"], help="prepare (here), expand (on the device), restore (here)")
    return {"prepare": prepare, "expand": expand, "restore": restore}[parser.parse_args().step]()


if __name__ == "__main__":
    sys.exit(main())
