"""Weights kept together with their description: the model card and the files that carry it.

A model's input scale, threshold and peak channels are part of the model, not constants of the
code: weights trained at native size must run at native size, DiPID's at torchvision's 800.
Our weights are safetensors files with the card as JSON in the metadata. DiPID's checkpoints
(torch state dicts, `.pt`/`.pth`) carry no card: DiPID's defaults stand in for it.
Settings from the config that are not None override the card.

torch is imported only by the functions that build tensors: the daemon reads cards (provenance)
without loading torch, which would add ~500 MiB to its memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pipeline.errors import PipelineError, one_line
from pipeline.models.preprocess import INPUT_TRANSFORMS

if TYPE_CHECKING:
    import torch

CARD_METADATA_KEY = "model_card"
# package data: in a checkout a link to the repository's top-level weights/, in the wheel a copy of it
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
WEIGHTS_DIR_ENV = "PIPELINE_WEIGHTS_DIR"
DEFAULT_FILES = {"tlm": "tlm.safetensors", "sslm": "sslm.safetensors"}


class TLMCardSettings(TypedDict):
    """The TLM fields of a card that DiPID published (`DIPID_TLM`)."""

    backbone: str
    min_size: int
    max_size: int
    score_threshold: float
    nms_iou: float


# DiPID's published settings, used for checkpoints that carry no card.
DIPID_TLM: TLMCardSettings = {
    "backbone": "resnet50_fpn", "min_size": 800, "max_size": 1333, "score_threshold": 0.4, "nms_iou": 0.5,
}
DIPID_SSLM_PEAK_CHANNELS = [66, 13]
SSLM_INPUT_TRANSFORMS = tuple(INPUT_TRANSFORMS)  # "log", "significance": see pipeline.models.preprocess


class WeightsError(PipelineError, ValueError):
    """Weights that cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is: enough to rebuild the model, run it the way it was trained, and trust it."""

    architecture: Literal["tlm", "sslm"]
    backbone: str | None = None  # TLM only: resnet50_fpn | resnet18_fpn
    min_size: int | None = None  # TLM input scale (torchvision's GeneralizedRCNNTransform)
    max_size: int | None = None
    score_threshold: float | None = None  # TLM: detections kept at or above this score
    nms_iou: float | None = None  # TLM: IoU above which lower-scoring boxes are suppressed
    proposals: int | None = None  # TLM: region proposals per image the box head scores at inference (None: the builder's)
    detections: int | None = None  # TLM: at most this many detections per image (None: the builder's)
    image_mean: float | None = None  # TLM: normalisation of the 3x repeated model input
    image_std: float | None = None
    peak_channels: list[int] | None = None  # SSLM: argmax clusters that mean "peak"
    final_relu: bool | None = None  # SSLM: ReLU before the last BatchNorm as in DiPID (None: True)
    input_transform: str | None = None  # SSLM: "log" (DiPID's log counts, None) | "significance"
    training_command: str = ""
    data: str = ""
    device: str = ""
    steps: int | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with the given fields changed; None values are ignored (config "not set")."""
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if value is not None})


def weights_dir() -> Path:
    """Where the shipped weights live: $PIPELINE_WEIGHTS_DIR, else `pipeline/weights` inside the installed package."""
    override = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(override) if override else DEFAULT_WEIGHTS_DIR


def default_weights_path(architecture: Literal["tlm", "sslm"]) -> Path:
    return weights_dir() / DEFAULT_FILES[architecture]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], card: ModelCard) -> str:
    """Write `state_dict` as safetensors with `card` in the metadata; returns the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    save_file(tensors, str(path), metadata={CARD_METADATA_KEY: card.to_json()})
    return sha256_of(path)


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_card(path: Path) -> ModelCard | None:
    """The card from a safetensors file's JSON header (8-byte little-endian length, then JSON), torch-free."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise WeightsError(f"{path}: not a valid weights file (shorter than a safetensors header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: not a valid weights file (header of {length} bytes)")
        header = handle.read(length)
    try:
        metadata = json.loads(header).get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise WeightsError(f"{path}: not a valid weights file (its header is not JSON)") from None
    text = metadata.get(CARD_METADATA_KEY)
    return ModelCard.from_json(text) if text else None


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard | None, str]:
    """(state dict, card or None, sha256) from a `.safetensors` file or a torch state dict `.pt`/`.pth`.

    Torch files are read with `weights_only=True` (tensors and plain containers only, no code).
    A training checkpoint (a dict with a "model" state dict) is accepted too.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path), device="cpu")
            card = read_card(path)
        else:
            loaded = torch.load(path, weights_only=True, map_location="cpu")
            if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
                loaded = loaded["model"]
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise WeightsError(f"{path}: not a state dict (expected a mapping of names to tensors)")
            state_dict, card = dict(loaded), None
    except WeightsError:
        raise
    except (SafetensorError, json.JSONDecodeError, TypeError) as error:
        raise WeightsError(f"{path}: not a valid weights file ({one_line(error)})") from None
    except Exception as error:  # torch.load raises many kinds; the user needs one line
        raise WeightsError(f"{path}: cannot read weights ({type(error).__name__}: {one_line(error)})") from None
    return state_dict, card, sha256_of(path)


def check_state_dict(path: Path, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a one-line WeightsError when `state_dict` does not fit `model` (missing/unexpected keys, shapes)."""
    expected = model.state_dict()
    ignorable = ("num_batches_tracked",)
    missing = [k for k in expected if k not in state_dict and not k.endswith(ignorable)]
    unexpected = [k for k in state_dict if k not in expected and not k.endswith(ignorable)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise WeightsError(f"{path}: does not fit the {type(model).__name__} model: " + ", ".join(parts))
    for key, value in state_dict.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def load_into(path: Path, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Check then load `state_dict` into `model` (buffers such as num_batches_tracked may be absent)."""
    check_state_dict(path, model, state_dict)
    model.load_state_dict(state_dict, strict=False)
