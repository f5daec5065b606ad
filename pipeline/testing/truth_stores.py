"""Stores written by the project's own writer from a simulated scan's ground truth, frame by frame.

A web view, a live viewer or a benchmark needs stores whose peaks are known and that grow while
they are looked at, without waiting for models: `TruthStoreWriter` writes the raw frames of a
`RockingScan` to an HDF5 file first (as a detector would have), then the store through
`ScanStore` in the daemon's order (masks and boxes, 3D labels, done flags, the tables), with the
simulator's true peaks as the masks. `write(n)` adds the next n frames, `finish()` ends it the
way a session does.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from pipeline.common.detector import FRAME_SHAPE
from pipeline.common.nexus import ScanInfo
from pipeline.common.volume import VolumeLinker
from pipeline.models.prediction import Detection, FramePrediction
from pipeline.simulator.synth import RockingScan
from pipeline.store import schema
from pipeline.store.writer import ScanStore

RAW_DATASET = "/entry/instrument/detector/data"


class TruthStoreWriter:
    """`<directory>/<name>.zarr`, its raw frames in `<name>-pilatus3_100k-files/<name>.hdf`, written frame by frame.

    `period`: the simulated scan is that many frames long and repeats (a 10,000-frame store without
    simulating 10,000 frames); its peaks then come back every `period` frames as new 3D peaks.
    """

    def __init__(self, directory: Path, name: str, n_frames: int, seed: int = 3, n_peaks: int | None = 2,
                 period: int | None = None, table_every: int = 1) -> None:
        self.directory = Path(directory)
        self.name = name
        self.n_frames = n_frames
        self.period = min(period or n_frames, n_frames)
        self.table_every = table_every
        self.scan = RockingScan(self.period, seed, n_peaks=n_peaks)
        self.raw_path = self.directory / f"{name}-pilatus3_100k-files" / f"{name}.hdf"
        self.store_path = self.directory / f"{name}.zarr"
        self._frames = [self.scan.frame(index) for index in range(self.period)]
        self._write_raw()
        axis_step = RockingScan.AXIS_STEP
        info = ScanInfo(nexus_path=self.directory / f"{name}.nxs", scan_id=name, layout="gda9", entry="entry",
                        source_file=self.raw_path, dataset=RAW_DATASET,
                        scan_command=f"scan eta {RockingScan.AXIS_START} {RockingScan.AXIS_START + axis_step * (n_frames - 1):.4f} "
                                     f"{axis_step} pil3_100k 1",
                        expected_frames=n_frames, axis_name=RockingScan.axis_name, start_time=f"simulated seed {seed}")
        self.store = ScanStore.create_or_resume(self.store_path, info, FRAME_SHAPE, {})
        self.linker = VolumeLinker(min_pixels=5)
        self.written = 0

    def _write_raw(self) -> None:
        self.raw_path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.raw_path, "w", libver="latest") as handle:
            data = handle.create_dataset(RAW_DATASET, shape=(self.n_frames, *FRAME_SHAPE), dtype=np.int32,
                                         chunks=(1, *FRAME_SHAPE), compression="lzf")
            block = np.stack([raw for raw, _ in self._frames])
            for start in range(0, self.n_frames, self.period):
                stop = min(start + self.period, self.n_frames)
                data[start:stop] = block[:stop - start]

    def axis_value(self, index: int) -> float:
        return RockingScan.AXIS_START + RockingScan.AXIS_STEP * index

    def truth(self, index: int) -> np.ndarray:
        """The simulator's peak ids in frame `index` (the TLM labels this store records)."""
        return self._frames[index % self.period][1]

    def raw(self, index: int) -> np.ndarray:
        return self._frames[index % self.period][0]

    def _prediction(self, index: int) -> FramePrediction:
        truth = self.truth(index)
        detections = [Detection(box=(float(window[1].start), float(window[0].start), float(window[1].stop), float(window[0].stop)),
                                score=0.9, instance_id=k + 1)
                      for k, window in enumerate(ndimage.find_objects(truth.astype(np.int64))) if window is not None]
        ssl_mask = ndimage.binary_dilation(truth > 0, iterations=2).astype(np.uint8)
        return FramePrediction(tlm_labels=truth.astype(np.uint16), detections=detections, ssl_clusters=ssl_mask.copy(), ssl_mask=ssl_mask)

    def write(self, count: int = 1) -> int:
        """The next `count` frames, in the daemon's order (done flags after everything else); returns frames done."""
        first = self.written
        indices = list(range(first, min(first + count, self.n_frames)))
        if not indices:
            return self.written
        self.store.write_predictions({index: self._prediction(index) for index in indices}, {index: "truth" for index in indices})
        labels = [self.linker.link(index, self.truth(index) > 0, self.raw(index).astype(np.float64), self.axis_value(index))
                  for index in indices]
        self.store.write_volumes(first, labels, [self.axis_value(index) for index in indices], [True] * len(indices))
        self.written = indices[-1] + 1
        if self.written // self.table_every != first // self.table_every or self.written == self.n_frames:
            self.store.write_tables(self.linker.table(), range(self.written))
        return self.written

    def finish(self, status: str = schema.STATUS_COMPLETE, reason: str = "finished") -> None:
        """Record how the scan ended (and consolidate), as a session does at its end; the store's lock is let go."""
        self.store.write_tables(self.linker.table(), range(self.written))
        self.store.finish(status, reason, self.written)
        self.store.close()
