"""The ONNX Runtime backend: torch's masks on held-out frames, graphs cached by weights and settings, no torch at run time.

Real parts throughout: the shipped weights, graphs exported into a cache made for this module, ONNX Runtime
sessions, the shipped real Pilatus modules and `pipeline evaluate`'s held-out simulator frames, and child Python
processes for what a worker does (the export child, a worker that must not import torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import ModelSettings
from pipeline.models import onnx_export
from pipeline.models.backends import BackendError, build_predictor, choose_backend
from pipeline.models.card import WeightsError, default_weights_path, load_weights, read_card, save_weights, sha256_of
from pipeline.models.evaluate import HELD_OUT_SETTINGS, evaluate, format_report
from pipeline.models.joint import JointPredictor
from pipeline.models.onnx_predictor import OnnxJointPredictor, paint_patches, resize_bilinear
from pipeline.models.real_frames import REAL_MODULES, load_frames
from pipeline.simulator import synth
from pipeline.testing.scripts import script_module

REPO = Path(__file__).resolve().parents[1]
# Measured on 8 real modules, 12 held-out frames, a blank frame and a 619 x 487 frame (2026-12-04): detection counts
# equal on every frame, TLM labels equal on 100.0000 % of the pixels, SSLM clusters on 99.9998 % (a pixel whose two
# best clusters are within float rounding). The bounds leave room for other CPUs' kernels, no more.
TLM_PIXELS_EQUAL = 0.999
SSLM_PIXELS_EQUAL = 0.9999
GAP_ROWS = 17  # between the modules of a Pilatus 300K: 3 x 195 + 2 x 17 = 619 rows


def settings_with(cache: Path, **changes: Any) -> ModelSettings:
    """The shipped models in float32 with graphs in `cache`, plus `changes` to the `models` section."""
    return ModelSettings.model_validate({"precision": "float32", "onnx_cache": str(cache), **changes})


def pilatus_300k_frame() -> np.ndarray:
    """A 619 x 487 frame: three real modules with the detector's gap rows (read as -1) between them."""
    modules = load_frames(REAL_MODULES)[0]
    gap = np.full((GAP_ROWS, modules.shape[2]), -1, dtype=modules.dtype)
    return np.concatenate([modules[1], gap, modules[2], gap, modules[3]])


def held_out_frames(count: int) -> list[np.ndarray]:
    """The first `count` frames of `pipeline evaluate`'s held-out set (seed 12345)."""
    return [synth.training_sample(np.random.default_rng([12345, index]), HELD_OUT_SETTINGS)[0] for index in range(count)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def predictors(cache: Path) -> tuple[JointPredictor, OnnxJointPredictor]:
    """torch (the reference) and ONNX Runtime on the shipped weights; the graphs exported here, into `cache`."""
    settings = settings_with(cache)
    return (JointPredictor.from_settings(settings, device="cpu"),
            OnnxJointPredictor(settings, threads=0, exporter=onnx_export.export_in_process))


def compare(reference: JointPredictor | OnnxJointPredictor, other: OnnxJointPredictor, frames: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per frame: detection counts, caps, equal-pixel shares of TLM labels and SSLM clusters, largest box/score change."""
    rows = []
    for frame in frames:
        (a,) = reference.predict_batch(frame[None])
        (b,) = other.predict_batch(frame[None])
        same_count = len(a.detections) == len(b.detections)
        rows.append({
            "shape": frame.shape, "detections": (len(a.detections), len(b.detections)),
            "caps": (a.detection_cap, b.detection_cap), "capped": (a.detections_capped, b.detections_capped),
            "tlm_equal": float(np.mean(a.tlm_labels == b.tlm_labels)),
            "sslm_equal": float(np.mean(a.ssl_clusters == b.ssl_clusters)),
            "mask_equal": float(np.mean(a.ssl_mask == b.ssl_mask)),
            "box_change": max((abs(p - q) for x, y in zip(a.detections, b.detections) for p, q in zip(x.box, y.box)), default=0.0)
            if same_count else float("inf"),
            "score_change": max((abs(x.score - y.score) for x, y in zip(a.detections, b.detections)), default=0.0)
            if same_count else float("inf"),
            "dtypes": (b.tlm_labels.dtype, b.ssl_clusters.dtype, b.ssl_mask.dtype), "shapes": (b.tlm_labels.shape, b.ssl_clusters.shape),
        })
    return rows


def test_painting_is_torchs(predictors) -> None:
    """The NumPy paint of mask patches gives tlm._paint_patches's labels; the bilinear resize is torch's to 2 ulp."""
    import torch.nn.functional as F

    from pipeline.models import tlm

    rng = np.random.default_rng(7)
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(1, 160, 2))
        patch = rng.random((30, 30), dtype=np.float32)
        expected = F.interpolate(torch.from_numpy(patch)[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        assert np.abs(resize_bilinear(patch, height, width) - expected.numpy()).max() <= 2.5e-7
    pixels = 0
    for _ in range(60):
        count = int(rng.integers(1, 30))
        x0, y0 = rng.uniform(-20, 480, count), rng.uniform(-20, 190, count)
        boxes = np.stack([x0, y0, x0 + rng.uniform(0, 120, count), y0 + rng.uniform(0, 100, count)], 1).astype(np.float32)
        patches = rng.random((count, 28, 28), dtype=np.float32)
        order = np.argsort(-rng.random(count), kind="stable")
        expected_labels, labels = np.zeros((195, 487), np.uint16), np.zeros((195, 487), np.uint16)
        tlm._paint_patches(expected_labels, torch.from_numpy(patches[:, None]), torch.from_numpy(boxes), order)
        paint_patches(labels, patches, boxes, order)
        np.testing.assert_array_equal(labels, expected_labels)
        pixels += int(np.count_nonzero(labels))
    assert pixels > 100_000  # the boxes really painted something


def test_caps_follow_the_frame_area_as_torchs() -> None:
    from pipeline.models.tlm import build_tlm, light_card

    model = build_tlm(light_card())
    reference = tuple(model.reference_caps)
    for shape in [(195, 487), (100, 100), (619, 487), (1065, 1030), (4000, 4000)]:
        assert onnx_export.caps_for_shape(reference, shape) == model.caps(shape)


def test_same_masks_as_torch_on_held_out_and_real_frames(predictors) -> None:
    """8 real thaumatin modules (crowded), 12 held-out simulator frames, a blank frame and a 619 x 487 frame."""
    reference, onnx = predictors
    frames = [*load_frames(REAL_MODULES)[0], *held_out_frames(12), np.zeros((195, 487), np.int32), pilatus_300k_frame()]
    rows = compare(reference, onnx, frames)
    for row in rows:
        print(row["shape"], "detections", row["detections"], f"TLM {row['tlm_equal']:.6f}", f"SSLM {row['sslm_equal']:.6f}",
              f"box {row['box_change']:.2e} px, score {row['score_change']:.2e}")
    assert all(row["detections"][0] == row["detections"][1] for row in rows)
    assert min(row["tlm_equal"] for row in rows) >= TLM_PIXELS_EQUAL
    assert min(row["sslm_equal"] for row in rows) >= SSLM_PIXELS_EQUAL
    assert min(row["mask_equal"] for row in rows) >= SSLM_PIXELS_EQUAL
    assert max(row["box_change"] for row in rows) < 0.05 and max(row["score_change"] for row in rows) < 1e-3
    assert all(row["caps"][0] == row["caps"][1] and row["capped"][0] == row["capped"][1] for row in rows)
    assert all(row["dtypes"] == (np.uint16, np.uint8, np.uint8) for row in rows)
    assert sum(row["detections"][0] for row in rows[:8]) > 100 and rows[20]["detections"] == (0, 0)
    big = rows[-1]
    assert big["shape"] == (619, 487) and big["caps"] == (256, 256) and big["detections"][0] > 40  # a graph of its own caps
    assert big["shapes"] == ((619, 487), (619, 487))
    caps = onnx_export.caps_for_shape(onnx.reference_caps, (619, 487))
    assert set(onnx.tlm_sessions) == {onnx.reference_caps, caps}
    assert onnx.provenance() == {**reference.provenance(), "backend": "onnxruntime"}


def test_an_input_scale_setting_gets_its_own_graph_with_the_same_masks(cache: Path, predictors) -> None:
    """min_size/max_size change the graph (a resize inside it): a new cache file, and still torch's masks."""
    before = set(cache.glob("tlm-*.onnx"))
    settings = settings_with(cache, tlm={"min_size": 390, "max_size": 974}, sslm={"enabled": False})
    onnx = OnnxJointPredictor(settings, exporter=onnx_export.export_in_process)
    new = set(cache.glob("tlm-*.onnx")) - before
    assert len(new) == 1 and onnx.tlm_card["min_size"] == 390
    modules = load_frames(REAL_MODULES)[0]
    rows = compare(JointPredictor.from_settings(settings), onnx, [modules[4], modules[5][:150, :300]])
    assert all(row["detections"][0] == row["detections"][1] > 0 for row in rows)
    assert min(row["tlm_equal"] for row in rows) >= TLM_PIXELS_EQUAL


def test_the_cache_is_reused_and_new_weights_make_a_new_file(cache: Path, predictors, tmp_path: Path) -> None:
    settings = settings_with(cache)
    files = {path: path.stat().st_mtime_ns for path in cache.glob("*.onnx")}
    exports = onnx_export.EXPORTS

    def no_export(*args: Any) -> None:
        raise AssertionError(f"exported again: {args[1:]}")

    again = OnnxJointPredictor(settings, exporter=no_export)
    assert onnx_export.EXPORTS == exports
    assert {path: path.stat().st_mtime_ns for path in cache.glob("*.onnx")} == files
    frame = load_frames(REAL_MODULES)[0][0]
    np.testing.assert_array_equal(again.predict_image(frame).tlm_labels, predictors[1].predict_image(frame).tlm_labels)

    # changed weights: the SSLM's first bias moved; the backend's own path exports it in a child process
    state_dict, _, _ = load_weights(default_weights_path("sslm"))
    state_dict = {key: value + 0.05 if key == "conv1.bias" else value for key, value in state_dict.items()}
    card = read_card(default_weights_path("sslm"))
    assert card is not None
    changed = tmp_path / "sslm-changed.safetensors"
    save_weights(changed, state_dict, card)
    changed_settings = settings_with(cache, backend="onnxruntime", tlm={"enabled": False}, sslm={"weights": str(changed)})
    predictor = build_predictor(changed_settings, device="cpu", threads=1)
    assert isinstance(predictor, OnnxJointPredictor) and onnx_export.EXPORTS == exports  # exported by the child, not here
    new_files = set(cache.glob("sslm-*.onnx")) - set(files)
    assert [path.name.split("-")[1] for path in new_files] == [sha256_of(changed)[:16]]
    assert {path: path.stat().st_mtime_ns for path in files} == files  # the old graphs untouched
    rows = compare(JointPredictor.from_settings(changed_settings), predictor, [frame, held_out_frames(1)[0]])
    assert min(row["sslm_equal"] for row in rows) >= SSLM_PIXELS_EQUAL
    original = predictors[1].predict_image(frame).ssl_clusters
    assert np.mean(predictor.predict_image(frame).ssl_clusters != original) > 0.01  # really other weights


WORKER = """
import json, sys, time
started = time.perf_counter()
from pipeline.config import ModelSettings
from pipeline.models.backends import build_predictor
from pipeline.models.real_frames import REAL_MODULES, load_frames
imported = time.perf_counter()
predictor = build_predictor(ModelSettings.model_validate_json(sys.argv[1]), device=sys.argv[2], threads=1)
ready = time.perf_counter()
(prediction,) = predictor.predict_batch(load_frames(REAL_MODULES)[0][:1])
done = time.perf_counter()
print(json.dumps({"torch": "torch" in sys.modules, "torchvision": "torchvision" in sys.modules,
                  "type": type(predictor).__name__, "import_s": imported - started, "ready_s": ready - started,
                  "frame_s": done - ready, "detections": len(prediction.detections),
                  "peak_rss_mib": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024}))
"""


def run_worker_child(settings: ModelSettings, device: str = "cpu", prelude: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", prelude + WORKER, settings.model_dump_json(), device],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_an_onnx_worker_never_imports_torch(cache: Path, predictors) -> None:
    """What a CPU worker does (build the predictor, predict a frame) in a fresh process: no torch, ready in seconds."""
    done = run_worker_child(settings_with(cache, backend="onnxruntime"))
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.splitlines()[-1])
    print(f"onnxruntime worker: imports {figures['import_s']:.2f} s, ready {figures['ready_s']:.2f} s, first frame "
          f"{figures['frame_s']:.2f} s, peak RSS {figures['peak_rss_mib']:.0f} MiB")
    assert figures["type"] == "OnnxJointPredictor" and not figures["torch"] and not figures["torchvision"]
    assert figures["import_s"] < 10.0  # generous: ~1 s on a quiet 2-core machine
    first = load_frames(REAL_MODULES)[0][0]
    assert figures["detections"] == len(predictors[1].predict_image(first).detections) > 0
    auto = run_worker_child(settings_with(cache))  # auto on a CPU picks it too where precision is float32
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout.splitlines()[-1])["type"] == "OnnxJointPredictor"


def test_the_backend_choice(cache: Path) -> None:
    assert choose_backend(settings_with(cache), "cpu") == "onnxruntime"
    assert choose_backend(settings_with(cache, backend="torch"), "cpu") == "torch"
    assert choose_backend(settings_with(cache, precision="bfloat16"), "cpu") == "torch"
    assert choose_backend(settings_with(cache), "cuda") == "torch"
    assert choose_backend(settings_with(cache, backend="onnxruntime"), "cpu") == "onnxruntime"
    for changes, device, words in [({}, "cuda:0", "CPU only"), ({"precision": "bfloat16"}, "cpu", "bfloat16")]:
        with pytest.raises(BackendError) as error:
            build_predictor(settings_with(cache, backend="onnxruntime", **changes), device=device)
        message = str(error.value)
        print(message)
        assert words in message and "\n" not in message
    assert isinstance(build_predictor(settings_with(cache, backend="torch"), device="cpu"), JointPredictor)


def test_onnxruntime_missing_is_one_line_and_auto_falls_back_to_torch(cache: Path) -> None:
    """A Python where `import onnxruntime` fails (blocked in sys.modules, as Python does for a missing module)."""
    blocked = "import sys; sys.modules['onnxruntime'] = None\n"
    asked = run_worker_child(settings_with(cache, backend="onnxruntime"), prelude=blocked)
    assert asked.returncode != 0
    last = asked.stderr.strip().splitlines()[-1]
    print(last)
    assert "BackendError" in last and "onnxruntime package is not installed" in last
    auto = run_worker_child(settings_with(cache), prelude=blocked)
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout.splitlines()[-1])["type"] == "JointPredictor"


def test_bad_weights_and_broken_graphs_are_one_line(cache: Path, predictors, tmp_path: Path) -> None:
    missing = settings_with(cache, backend="onnxruntime", sslm={"weights": str(tmp_path / "nowhere.safetensors")})
    with pytest.raises(WeightsError, match="nowhere.safetensors: weights file not found"):
        build_predictor(missing, device="cpu")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightsError) as error:  # the export child's one line, passed on
        build_predictor(settings_with(tmp_path / "cache", backend="onnxruntime", tlm={"enabled": False},
                                      sslm={"weights": str(broken)}), device="cpu")
    assert "broken.safetensors" in str(error.value) and "\n" not in str(error.value)
    # a graph damaged in the cache (its manifest intact): refused naming the file
    damaged_cache = tmp_path / "damaged"
    damaged_cache.mkdir()
    settings = settings_with(damaged_cache, tlm={"enabled": False})
    graph = onnx_export.find(settings_with(cache), "sslm")
    assert graph is not None
    stem = damaged_cache / onnx_export.graph_name(settings, "sslm", sha256_of(default_weights_path("sslm")))
    stem.with_suffix(".json").write_text(json.dumps(graph.manifest))
    stem.with_suffix(".onnx").write_bytes(graph.path.read_bytes()[:1000])
    with pytest.raises(WeightsError) as error:
        OnnxJointPredictor(settings)
    assert str(error.value).startswith(f"{stem.with_suffix('.onnx')}: cannot load the ONNX graph") and "\n" not in str(error.value)


def test_evaluate_prints_both_backends(cache: Path, predictors) -> None:
    report = evaluate(settings_with(cache), frames=3, scans=1, scan_frames=2, real_frames=None,
                      baseline_thresholds={"baseline": 0.22, "baseline_significance": 0.24}, backends=["torch", "onnxruntime"])
    onnx = report["backends"]["onnxruntime"]
    assert onnx["agreement"]["frames"] == 5 and onnx["agreement"]["same_detection_count"] == 5
    assert onnx["methods"]["tlm"]["f1"] == report["methods"]["tlm"]["f1"]
    assert onnx["models"]["backend"] == "onnxruntime"
    text = format_report(report)
    print(text)
    assert "backend onnxruntime (cpu, float32), the same frames:" in text and "same masks as torch (float32):" in text
    assert text.index("precision: float32, device cpu") < text.index("backend onnxruntime")
    only_torch = evaluate(settings_with(cache), frames=1, scans=0, real_frames=None,
                          baseline_thresholds={"baseline": 0.22, "baseline_significance": 0.24}, backends=["torch"])
    assert "backends" not in only_torch


def test_workers_starting_together_export_once(tmp_path: Path) -> None:
    """Two export children at once into an empty cache: one exports under the lock, the other then finds the file."""
    settings = settings_with(tmp_path / "cache", tlm={"enabled": False})
    command = [sys.executable, "-m", "pipeline.models.onnx_export", "--settings-json", settings.model_dump_json(), "--kind", "sslm"]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outputs = [child.communicate(timeout=600) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    said = sorted(out.strip().rsplit(" ", 1)[1] for out, _ in outputs)
    assert said == ["(cached)", "(exported)"]
    assert len({out.strip().rsplit(" ", 1)[0] for out, _ in outputs}) == 1
    assert sorted(path.suffix for path in (tmp_path / "cache").iterdir()) == [".json", ".lock", ".onnx"]  # no temporary left


def test_the_flop_floor_counts_the_models_convolutions_and_onnx_bench_prints_it(cache: Path, predictors) -> None:
    """The floor's FLOPs are the SSLM's convolutions counted by hand; onnx_bench prints each backend against it."""
    from pipeline.tools.bench import flop_floor

    reference, _ = predictors
    frame = held_out_frames(1)[0]
    assert reference.sslm is not None and reference.tlm is not None
    convolutions = [reference.sslm.convs[0], reference.sslm.convs[1], reference.sslm.conv3]
    by_hand = sum(2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * frame.size
                  for conv in convolutions) / 1e9
    counted = flop_floor.model_gflops(reference, frame[None])
    assert counted["sslm"] == pytest.approx(by_hand, rel=1e-9)
    # the TLM's ResNet-18 backbone alone is 8.3 GFLOP on a 195 x 487 frame; its FPN, RPN and heads ~9 more
    assert 12 < counted["tlm"] < 30
    gflops = flop_floor.matmul_gflops(1)
    assert 1 < gflops < 10_000
    assert flop_floor.floor_ms(counted, gflops)["sslm"] == pytest.approx(by_hand / gflops * 1000)

    onnx_bench = script_module("onnx_bench")
    result = onnx_bench.bench(settings_with(cache), np.stack(held_out_frames(2)), threads=1)
    text = onnx_bench.format_bench(result)
    print(text)
    assert result["gflop_per_frame"]["sslm"] == pytest.approx(by_hand, rel=1e-9)
    for name in ("torch", "onnxruntime"):
        for kind in ("tlm", "sslm"):
            assert result["times_floor"][name][kind] == pytest.approx(result["ms_per_frame"][name][kind] / result["floor_ms"][kind])
            assert result["times_floor"][name][kind] > 0.5  # no backend beats the CPU's own matrix product by 2x
        both = (result["ms_per_frame"][name]["tlm"] + result["ms_per_frame"][name]["sslm"]) / sum(result["floor_ms"].values())
        assert result["times_floor"][name]["models"] == pytest.approx(both)
    assert "FLOP floor at this CPU's float32 matrix product" in text
    assert any(line.startswith("onnxruntime float32") and "both models" in line and line.endswith("x the floor")
               for line in text.splitlines())
    assert f"SSLM {by_hand:.2f} GFLOP" in text
