"""scripts/device_kit.py: the TLM weights halved for the trip to a GPU machine come back with the same tensors'
shapes, types and model card, and the kit's size count is what git would send."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from pipeline.testing.scripts import script_module

REPO = Path(__file__).resolve().parents[1]
device_kit = script_module("device_kit")


def test_float16_and_back_keeps_shapes_types_card_and_integers(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {"conv.weight": rng.normal(size=(64, 32, 3, 3)).astype(np.float32), "bn.num_batches": np.array([12345678], np.int64)}
    card = {"card": '{"name": "tlm", "peak_channels": null}'}
    source = tmp_path / "w.safetensors"
    save_file(tensors, str(source), metadata=card)
    half, back = tmp_path / "half.safetensors", tmp_path / "back.safetensors"
    device_kit.convert(source, half, "float16")
    device_kit.convert(half, back, "float32")
    assert half.stat().st_size < 0.6 * source.stat().st_size
    with safe_open(str(back), framework="numpy") as weights:
        assert weights.metadata() == card
        restored = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    assert restored["conv.weight"].dtype == np.float32 and restored["conv.weight"].shape == (64, 32, 3, 3)
    np.testing.assert_allclose(restored["conv.weight"], tensors["conv.weight"], rtol=1e-3, atol=1e-4)
    assert not np.array_equal(restored["conv.weight"], tensors["conv.weight"])  # really went through float16
    assert restored["bn.num_batches"].dtype == np.int64 and restored["bn.num_batches"][0] == 12345678  # untouched


def test_the_travelling_size_counts_the_tracked_files_and_the_shipped_weights() -> None:
    size = device_kit.travelling_bytes()
    assert size >= device_kit.WEIGHTS.stat().st_size + (REPO / "README.md").stat().st_size
    # with the TLM weights in the tree, a device run could not send it: prepare takes them out
    assert size > device_kit.LIMIT_BYTES
