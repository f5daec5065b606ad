"""The two models as ONNX files in a cache, made from the weights in use, for the ONNX Runtime backend.

Why: on a CPU, ONNX Runtime runs the same graphs in ~0.6x (SSLM) and ~0.8x (TLM) of torch's time, and a worker that
only runs them needs no torch (ready in a second or two, far less memory; see `pipeline.models.onnx_predictor`).
torch stays the reference: the graphs are traced from the very modules `pipeline.models.joint` loads
(`load_tlm`/`load_sslm`, so a facility's DiPID checkpoint works as the shipped files do), with the TorchScript
exporter (`dynamo=False`, opset 17; the dynamo exporter fails on the detection transform's resize/pad step).

What each graph holds, so that its caller needs no torch:
- TLM: one frame's model input (H, W) float32 -> `boxes` (N, 4) in frame pixels, `scores` (N,), `mask_patches`
  (N, 28, 28) mask probabilities; the 3-channel repeat, normalisation, resize, padding, RPN, NMS, box and mask
  heads are inside. Painting the patches into a label image is NumPy (`onnx_predictor.paint_patches`).
  H and W are dynamic axes, but the caps (proposals before/after NMS, detections) are constants of a graph and
  grow with the frame area (`pipeline.models.tlm.FrameMaskRCNN.caps`): one graph serves every frame of up to
  195 x 487 pixels, a larger frame gets a graph for its caps (`caps_for_shape`), exported on first use.
- SSLM: (H, W) float32 input -> (H, W) uint8 cluster ids (argmax over the 100 channels inside the graph, the
  fast SSLM's folded BatchNorm as torch runs it). Peak channels are applied by the caller, not in the graph.

Cache: `models.onnx_cache`, else `$XDG_CACHE_HOME/pipeline/onnx`, else `~/.cache/pipeline/onnx`. A file's name
holds the weights' SHA-256 and a hash of everything else that changes the graph: the config's TLM settings
(backbone, input scale, threshold, NMS, caps), the opset, this module's EXPORT_FORMAT, and the torch and
torchvision versions (their tracing and detection code make the graph). Beside each `.onnx` a `.json` manifest
records what was exported (the card, the reference caps); it is written last, so a graph counts as present only
when its manifest is. Both are written to a temporary file and renamed, and exports of one file take a lock:
two workers starting together never read half a file, nor export twice. Nothing is downloaded.

This module imports torch only inside the functions that export; naming and finding files is torch-free.
`python -m pipeline.models.onnx_export` exports on demand (the ONNX predictor's builder runs it as a child
process on a cache miss, so that the worker itself never imports torch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pipeline.common.detector import FRAME_SHAPE
from pipeline.errors import one_line
from pipeline.models.card import WeightsError, default_weights_path, sha256_of
from pipeline.store.schema import MAX_DETECTIONS_PER_FRAME

if TYPE_CHECKING:
    import torch

    from pipeline.config import ModelSettings

Kind = Literal["tlm", "sslm"]
KINDS: tuple[Kind, ...] = ("tlm", "sslm")
OPSET = 17
EXPORT_FORMAT = 1
"""Bumped whenever what this module puts into a graph changes: old cache files then stop matching."""
CACHE_ENV = "XDG_CACHE_HOME"
EXPORTS = 0
"""Graphs this process has exported (a test reads it to see that a second build reused the cache)."""
Caps = tuple[int, int, int]


def cache_dir(settings: ModelSettings) -> Path:
    """Where the graphs live: `models.onnx_cache`, else $XDG_CACHE_HOME/pipeline/onnx, else ~/.cache/pipeline/onnx."""
    if settings.onnx_cache is not None:
        return Path(settings.onnx_cache).expanduser()
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache") / "pipeline" / "onnx"


def weights_path(settings: ModelSettings, kind: Kind) -> Path:
    """The weights file a model loads (the config's, else the shipped one); one-line WeightsError when absent."""
    configured = settings.tlm.weights if kind == "tlm" else settings.sslm.weights
    path = Path(configured) if configured is not None else default_weights_path(kind)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    return path


def _version(package: str) -> str:
    """An installed package's version, read from its metadata (no import: the ONNX worker must not load torch)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def graph_settings(settings: ModelSettings, kind: Kind) -> dict[str, Any]:
    """The config values that change a model's graph (all of the section but `enabled`, `weights`, `peak_channels`).

    Taken as a whole, not listed one by one: a setting added later changes the cache key by default.
    """
    section = settings.tlm if kind == "tlm" else settings.sslm
    return section.model_dump(mode="json", exclude={"enabled", "weights", "peak_channels", "int8"})  # int8: see graph_name


def graph_name(settings: ModelSettings, kind: Kind, sha256: str, caps: Caps | None = None) -> str:
    """`<kind>-<weights sha256, 16 hex>-<hash of the rest, 12 hex>[-caps<pre>x<post>x<detections>]`: one graph's file stem.

    `caps` None is the weights' own caps (every frame up to 195 x 487); other caps get their own file.
    """
    described = {
        "kind": kind, "settings": graph_settings(settings, kind), "opset": OPSET, "format": EXPORT_FORMAT,
        "torch": _version("torch"), "torchvision": _version("torchvision"),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    stem = f"{kind}-{sha256[:16]}-{digest}"
    if kind == "sslm" and settings.sslm.int8:  # made from that float32 graph: its stem, and what changes the int8 one
        from pipeline.models.onnx_quantize import int8_recipe, recipe_key

        return f"{stem}-int8-{recipe_key(int8_recipe(kind))}"
    return stem if caps is None else f"{stem}-caps{caps[0]}x{caps[1]}x{caps[2]}"


def caps_for_shape(reference: Caps, shape: tuple[int, ...]) -> Caps:
    """(proposals per level before NMS, after NMS, detections) of a frame (..., H, W): `FrameMaskRCNN.caps`, torch-free."""
    factor = max(1.0, shape[-2] * shape[-1] / (FRAME_SHAPE[0] * FRAME_SHAPE[1]))
    pre, post, detections = (math.ceil(cap * factor) for cap in reference)
    return pre, post, min(detections, MAX_DETECTIONS_PER_FRAME)


@dataclasses.dataclass(frozen=True)
class Graph:
    """One exported model: its `.onnx` file and its manifest (what was exported from what)."""

    path: Path
    manifest: dict[str, Any]


def find(settings: ModelSettings, kind: Kind, sha256: str | None = None, caps: Caps | None = None) -> Graph | None:
    """The cached graph for these settings (and caps), or None when it is not (completely) there. torch-free."""
    sha256 = sha256 or sha256_of(weights_path(settings, kind))
    stem = cache_dir(settings) / graph_name(settings, kind, sha256, caps)
    onnx_file, manifest_file = stem.with_suffix(".onnx"), stem.with_suffix(".json")
    if not (manifest_file.is_file() and onnx_file.is_file()):
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return None  # unreadable: exported again
    return Graph(onnx_file, manifest)


def ensure_onnx(settings: ModelSettings, kind: Kind, caps: Caps | None = None) -> Path:
    """The cached graph's path, exporting it first when it is missing (this imports torch; see the module docstring).

    A bad weights file raises a one-line WeightsError; an unwritable cache a one-line OSError naming it.
    """
    return _ensure(settings, kind, caps).path


def export_in_process(settings: ModelSettings, kind: Kind, caps: Caps | None = None) -> None:
    """`ensure_onnx` as an `OnnxJointPredictor` exporter, for a process that holds torch anyway (evaluation, benchmarks)."""
    ensure_onnx(settings, kind, caps)


def _ensure(settings: ModelSettings, kind: Kind, caps: Caps | None) -> Graph:
    sha256 = sha256_of(weights_path(settings, kind))
    found = find(settings, kind, sha256, caps)
    if found is not None:
        return found
    directory = cache_dir(settings)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{directory}: cannot make the ONNX cache ({one_line(error)})") from None
    stem = graph_name(settings, kind, sha256, caps)
    with _locked(directory / f"{stem}.lock"):
        found = find(settings, kind, sha256, caps)  # another process may have exported it while we waited
        if found is not None:
            return found
        return _export(settings, kind, sha256, caps, directory / stem)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` for the block: one exporter per graph at a time (others wait, then find it)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, write: Any) -> None:
    """`write(temporary path)`, then the file renamed to `path`: readers see the old file or the whole new one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as an ordinary file would be (mkstemp makes it 0600)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _export(settings: ModelSettings, kind: Kind, sha256: str, caps: Caps | None, stem: Path) -> Graph:
    """Trace the model into `stem.onnx`, then write `stem.json`; returns the graph."""
    global EXPORTS
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # torch's exporter writes the file through it
        raise WeightsError(f"exporting the {kind.upper()} to ONNX needs the onnx package (pip install onnx)")
    import torch

    from pipeline.models import joint

    started = time.perf_counter()
    manifest: dict[str, Any] = {"kind": kind, "opset": OPSET, "format": EXPORT_FORMAT, "torch": _version("torch"),
                                "torchvision": _version("torchvision"), "graph_settings": graph_settings(settings, kind)}
    tlm_graph, sslm_graph = _graph_modules()
    if kind == "tlm":
        model, loaded = joint.load_tlm(settings.tlm)
        pre, post, detections = cast(tuple[int, int, int], cast(Any, model).reference_caps)
        reference: Caps = (int(pre), int(post), int(detections))
        graph_caps = caps or reference
        module: torch.nn.Module = tlm_graph(model, graph_caps)
        outputs = ["boxes", "scores", "mask_patches"]
        axes = {"image": {0: "height", 1: "width"}, **{name: {0: "detections"} for name in outputs}}
        manifest |= {"reference_caps": list(reference), "caps": list(graph_caps)}
    elif settings.sslm.int8:
        return _quantize_sslm(settings, stem)
    else:
        # peak channels are the caller's (config over card), never the graph's: the card is kept as the weights say
        model, loaded = joint.load_sslm(settings.sslm.model_copy(update={"peak_channels": None}))
        module = sslm_graph(model)
        outputs = ["clusters"]
        axes = {"image": {0: "height", 1: "width"}, "clusters": {0: "height", 1: "width"}}
    if loaded.sha256 != sha256:
        raise WeightsError(f"{loaded.path}: changed while it was being exported (SHA-256 {loaded.sha256[:16]}..., "
                           f"expected {sha256[:16]}...)")
    manifest |= {"weights": str(loaded.path), "sha256": loaded.sha256, "card": dataclasses.asdict(loaded.card),
                 "inputs": ["image"], "outputs": outputs}
    example = torch.from_numpy(_example_input(loaded.card.input_transform if kind == "sslm" else None))

    def write_graph(temporary: Path) -> None:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings about shapes turned into constants: the caps
            torch.onnx.export(module.eval(), (example,), str(temporary), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=outputs, dynamic_axes=axes)

    _write_atomically(stem.with_suffix(".onnx"), write_graph)
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    manifest["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_atomically(stem.with_suffix(".json"), lambda temporary: temporary.write_text(json.dumps(manifest, indent=1) + "\n"))
    EXPORTS += 1
    return Graph(stem.with_suffix(".onnx"), manifest)


def _quantize_sslm(settings: ModelSettings, stem: Path) -> Graph:
    """The int8 SSLM (`models.sslm.int8`): quantized from the float32 graph of the same weights and settings (exported
    first if missing), calibrated on training-side frames; its manifest is the float32 one's plus what was quantized."""
    global EXPORTS
    from pipeline.models.onnx_quantize import calibration_inputs, int8_recipe, quantize_graph, recipe_key

    recipe = int8_recipe("sslm")
    source = _ensure(settings.model_copy(update={"sslm": settings.sslm.model_copy(update={"int8": False})}), "sslm", None)
    calibration = calibration_inputs("sslm", source.manifest["card"].get("input_transform") or "log")
    quantized = quantize_graph(source.path, stem.with_suffix(".onnx"), calibration, recipe)
    manifest = {**source.manifest, "int8": {"recipe": dataclasses.asdict(recipe), "recipe_key": recipe_key(recipe),
                                            "nodes": list(quantized.nodes_quantized),
                                            "calibration_frames": quantized.calibration_frames,
                                            "float32_graph": str(source.path), "seconds": quantized.seconds},
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_atomically(stem.with_suffix(".json"), lambda temporary: temporary.write_text(json.dumps(manifest, indent=1) + "\n"))
    EXPORTS += 1
    return Graph(stem.with_suffix(".onnx"), manifest)


def _example_input(input_transform: str | None) -> Any:
    """A real module of the shipped thaumatin frames, prepared as the model sees it: the trace then has detections."""
    from pipeline.models.preprocess import INPUT_TRANSFORMS
    from pipeline.models.real_frames import REAL_MODULES, load_frames

    frames, _ = load_frames(REAL_MODULES)
    return INPUT_TRANSFORMS[input_transform or "log"](frames[0])


def _graph_modules() -> tuple[type, type]:
    """The two wrapper classes, defined on first use: torch is imported only by an export."""
    import torch
    from torchvision.models.detection import MaskRCNN

    from pipeline.models import sslm as sslm_module

    class TLMGraph(torch.nn.Module):
        """One frame's model input (H, W) -> boxes, scores, mask patches, with fixed caps (see the module docstring)."""

        def __init__(self, model: Any, caps: Caps) -> None:
            super().__init__()
            self.model = model
            model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = caps[0], caps[1]
            model.roi_heads.detections_per_img = caps[2]

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # MaskRCNN's forward, not FrameMaskRCNN's: that one would set the caps from the traced example's shape
            output = MaskRCNN.forward(self.model, [image.unsqueeze(0).expand(3, -1, -1)])[0]
            return output["boxes"], output["scores"], output["mask_patches"][:, 0]

    class SSLMGraph(torch.nn.Module):
        """(H, W) input -> (H, W) uint8 cluster ids, through the same FastSSLM the torch predictor runs."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.fast = sslm_module.FastSSLM(model.eval())

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.fast(image[None, None]).argmax(dim=1)[0].to(torch.uint8)

    return TLMGraph, SSLMGraph


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.models.onnx_export`: export the graphs a config needs (or one, for a child of the predictor)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.models.onnx_export",
                                     description="Export the TLM and SSLM to the ONNX cache (no network).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=None, help="pipeline config whose models section is used")
    source.add_argument("--settings-json", default=None, help="the models section as JSON (what the predictor's builder passes)")
    parser.add_argument("--kind", choices=[*KINDS, "both"], default="both")
    parser.add_argument("--caps", default=None, metavar="PRE,POST,DETECTIONS", help="TLM caps of a larger frame")
    args = parser.parse_args(argv)
    from pipeline.config import ModelSettings, load_config
    from pipeline.errors import PipelineError

    try:
        if args.settings_json is not None:
            settings = ModelSettings.model_validate_json(args.settings_json)
        else:
            settings = load_config(args.config).models if args.config is not None else ModelSettings()
        values = [int(v) for v in args.caps.split(",")] if args.caps else None
        if values is not None and (len(values) != 3 or min(values) < 1):
            raise ValueError(f"--caps {args.caps}: expected three positive integers PRE,POST,DETECTIONS")
        caps: Caps | None = (values[0], values[1], values[2]) if values else None
        kinds = KINDS if args.kind == "both" else (args.kind,)
        for kind in kinds:
            if (settings.tlm if kind == "tlm" else settings.sslm).enabled or args.kind != "both":
                before = EXPORTS
                path = ensure_onnx(settings, kind, caps if kind == "tlm" else None)
                print(f"{path} ({'exported' if EXPORTS > before else 'cached'})", flush=True)
    except (PipelineError, ValueError, OSError) as error:
        print(f"pipeline onnx export: {one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # the exporter's own failures (torch.onnx raises many kinds): one line for the caller
        print(f"pipeline onnx export: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
