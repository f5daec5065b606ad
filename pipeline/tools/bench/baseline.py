"""DiPID's way, the figures' yardstick: one frame at a time in this process, per-pixel dead-pixel loop, TLM at 800."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.tools.bench.measure import mean_ms
from pipeline.tools.bench.progress import progress_bar

DIPID_MIN_SIZE, DIPID_MAX_SIZE = 800, 1333  # torchvision's default detection resize, which DiPID ran at


def run_baseline(config: Any, scan: Path, n_frames: int, out: Path, show_progress: bool) -> dict[str, Any]:
    """DiPID's way, one frame at a time in this process, with the same weights; frames/s and stage times.

    Per frame: open the file (SWMR read), read the frame, fix dead pixels with the per-pixel loop,
    normalise, TLM on the one frame at shorter side 800 (longer at most 1333), SSLM on the one
    frame (on the input its card asks for), and save labels, clusters and mask with `np.savez`.
    The models run as they are built, without the pipeline's inference speed-ups.
    """
    import torch

    from pipeline.common.devices import resolve_device
    from pipeline.live.follow import ScanFollower, open_hdf5
    from pipeline.models import sslm as sslm_module
    from pipeline.models import tlm as tlm_module
    from pipeline.models.joint import load_sslm, load_tlm
    from pipeline.models.preprocess import fix_dead_pixels_slow, to_model_input, to_significance

    device = resolve_device(config.workers.device)
    tlm = sslm = None
    tlm_card = None
    if config.models.tlm.enabled:
        tlm_settings = config.models.tlm.model_copy(update={"min_size": DIPID_MIN_SIZE, "max_size": DIPID_MAX_SIZE})
        tlm, loaded = load_tlm(tlm_settings)
        tlm, tlm_card = tlm.to(device).eval(), loaded.card
    peak_channels: list[int] = []
    sslm_significance = False
    if config.models.sslm.enabled:
        sslm, loaded = load_sslm(config.models.sslm)
        sslm, peak_channels = sslm.to(device).eval(), list(loaded.card.peak_channels or [])
        sslm_significance = loaded.card.input_transform == "significance"
    with ScanFollower(scan, config.follow) as follower:
        info = follower.open()
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, list[float]] = {"read": [], "preprocess": [], "tlm": [], "sslm": [], "write": []}
    bar = progress_bar(n_frames, "baseline (DiPID's way)", show_progress)
    started_all = time.perf_counter()
    try:
        for index in range(n_frames):
            started = time.perf_counter()
            with open_hdf5(info.source_file) as handle:
                raw = np.asarray(handle[info.dataset][index])
            read = time.perf_counter()
            fixed = fix_dead_pixels_slow(raw)
            image = torch.from_numpy(to_model_input(fixed)).to(device)
            sslm_image = torch.from_numpy(to_significance(fixed)).to(device) if sslm_significance else image
            prepared = time.perf_counter()
            labels = np.zeros(raw.shape, dtype=np.uint16)
            if tlm is not None:
                with torch.inference_mode():
                    output = tlm(tlm_module.to_images(image[None]))[0]
                labels, _ = tlm_module.paint_instances(output, raw.shape)
            tlm_done = time.perf_counter()
            clusters = mask = np.zeros(raw.shape, dtype=np.uint8)
            if sslm is not None:
                with torch.inference_mode():
                    response = sslm(sslm_image[None, None])
                batch_clusters, batch_mask = sslm_module.clusters_and_mask(response, peak_channels)
                clusters, mask = batch_clusters[0], batch_mask[0]
            sslm_done = time.perf_counter()
            np.savez(out / f"frame-{index:05d}.npz", tlm_labels=labels, ssl_clusters=clusters, ssl_mask=mask)
            written = time.perf_counter()
            for name, begin, end in (("read", started, read), ("preprocess", read, prepared), ("tlm", prepared, tlm_done),
                                     ("sslm", tlm_done, sslm_done), ("write", sslm_done, written)):
                stages[name].append(end - begin)
            bar.update()
    finally:
        bar.close()
    elapsed = time.perf_counter() - started_all
    return {
        "frames": n_frames,
        "elapsed_s": round(elapsed, 3),
        "fps": round(n_frames / elapsed, 3) if elapsed > 0 else None,
        "tlm_min_size": DIPID_MIN_SIZE, "tlm_max_size": DIPID_MAX_SIZE,
        "tlm_backbone": None if tlm_card is None else tlm_card.backbone,
        "stages_ms": {name: mean_ms(values) for name, values in stages.items()},
        "device": str(device),
    }
