"""Scan files shaped like real I16 ones: NeXus metadata the way GDA 9 and GDA 8 write it.

The simulator's own files put the scan axis where the follower used to look for it; real files
do not. These builders follow what a real I16 scan file holds (see the design notes): GDA 9's
`entry/pil3_100k` NXdata with `@axes = [hkl_l, ., .]` beside constant datasets (`count_time`,
`kmu`, ...), `diamond_scan/scan_shape` and keys; GDA 8's `entry1/measurement` with `@axes = [h]`
and `entry1/scan_dimensions`. The frames come from the simulator (`RockingScan`) and sit in a
separate detector file behind an external link, as the Pilatus' own writer leaves them.
Options give what real scans show too: h and k held but jittered by ~4e-14 (the diffractometer
computes them), a motor scan (`scan eta ...`), and a default NXdata without `@axes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.common.detector import FRAME_SHAPE
from pipeline.simulator.synth import RockingScan

DETECTOR_DATASET = "/entry/instrument/detector/data"


@dataclass(frozen=True)
class I16Scan:
    """What to write: where, which layout, how many frames, and how the metadata names things."""

    directory: Path
    name: str
    layout: str  # "gda9" or "gda8"
    n_frames: int = 6
    seed: int = 3
    detector: str = "pil3_100k"  # the NXdetector group's name
    scanned: str = "l"  # which of h, k, l varies, or a motor's name (`eta`): then h, k and l are all held
    start: float = 0.9
    step: float = 0.001
    gda8_axis: str | None = None  # what GDA 8's `entry1/measurement@axes` names: the scan's first field, varying or not (h; or the motor)
    constants: dict[str, float] = field(default_factory=lambda: {"count_time": 1.0, "kmu": 0.0, "kphi": -90.0})
    held: tuple[float, float, float] = (0.0, 0.0, 0.0)  # h, k, l where the scan holds them
    jitter: float = 0.0  # held h, k, l wander by up to this much, as a diffractometer's computed h and k do (~4e-14)
    axes: bool = True  # whether the default NXdata names its axis (`@axes`); without, only the scan command tells it

    @property
    def hkl_scan(self) -> bool:
        return self.scanned in ("h", "k", "l")

    @property
    def axis_field(self) -> str:
        """The name of the dataset that holds the scan axis in the default NXdata group."""
        if not self.hkl_scan:
            return self.scanned
        return f"hkl_{self.scanned}" if self.layout == "gda9" else self.scanned

    @property
    def nxs_path(self) -> Path:
        return self.directory / f"{self.name}.nxs"

    @property
    def detector_path(self) -> Path:
        return self.directory / f"{self.name}-pilatus3_100k-files" / f"{self.name}.hdf"

    @property
    def link(self) -> str:
        return f"{self.name}-pilatus3_100k-files/{self.name}.hdf"

    def points(self) -> np.ndarray:
        """The scanned field's value at every scan point."""
        return self.start + self.step * np.arange(self.n_frames)

    def hkl(self) -> dict[str, np.ndarray]:
        """h, k, l at every scan point: only `scanned` varies; the held ones wander by `jitter` (seeded)."""
        rng = np.random.default_rng(self.seed)
        values = {axis: value + rng.uniform(-self.jitter, self.jitter, self.n_frames) for axis, value in zip("hkl", self.held)}
        if self.hkl_scan:
            values[self.scanned] = self.points()
        return values

    def motors(self) -> dict[str, np.ndarray]:
        """The scanned motor's values (an `eta` scan), beside h, k, l; empty for an hkl scan."""
        return {} if self.hkl_scan else {self.scanned: self.points()}

    def scan_command(self) -> str:
        if not self.hkl_scan:
            return f"scan {self.scanned} {self.start} {self.start + self.step * (self.n_frames - 1)} {self.step} {self.detector} 1"
        start = list(self.held)
        stop = list(self.held)
        step = [0.0, 0.0, 0.0]
        axis = "hkl".index(self.scanned)
        start[axis], stop[axis], step[axis] = self.start, self.start + self.step * (self.n_frames - 1), self.step
        return f"scan hkl {start} {stop} {step} {self.detector} 1"

    def frames(self) -> np.ndarray:
        scan = RockingScan(self.n_frames, seed=self.seed)
        return np.stack([scan.frame(i)[0] for i in range(self.n_frames)]).astype(np.int32)


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def write_detector_file(scan: I16Scan, frames: np.ndarray | None = None, libver: str = "latest") -> Path:
    """The Pilatus writer's file: frames at /entry/instrument/detector/data, one frame per chunk.
    `libver="earliest"` makes the version-0 superblock (and old chunk index) that older writers leave."""
    frames = scan.frames() if frames is None else frames
    scan.detector_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(scan.detector_path, "w", libver=libver) as handle:
        handle.create_dataset(DETECTOR_DATASET, data=frames, chunks=(1, *FRAME_SHAPE), maxshape=(None, *FRAME_SHAPE))
    return scan.detector_path


def write_gda9(scan: I16Scan, finished: bool = True) -> Path:
    """A finished (or, with `finished=False`, still running) GDA 9 scan file and its detector file."""
    write_detector_file(scan)
    n = scan.n_frames
    hkl = scan.hkl()
    with h5py.File(scan.nxs_path, "w", libver="latest") as handle:
        entry = _group(handle, "entry", "NXentry")
        entry.attrs["default"] = scan.detector
        entry["start_time"] = "2024-06-01T10:00:00"
        entry["end_time"] = "2024-06-01T10:01:00" if finished else ""
        instrument = _group(entry, "instrument", "NXinstrument")
        detector = _group(instrument, scan.detector, "NXdetector")
        detector["data"] = h5py.ExternalLink(scan.link, DETECTOR_DATASET)
        detector["count_time"] = np.full(n, scan.constants["count_time"])
        positioners = _group(instrument, "hkl", "NXpositioner")
        for axis, values in hkl.items():
            positioners[axis] = values
        nxdata = _group(entry, scan.detector, "NXdata")
        nxdata.attrs["signal"] = "data"
        if scan.axes:
            nxdata.attrs["axes"] = [scan.axis_field, ".", "."]
            nxdata.attrs[f"{scan.axis_field}_indices"] = [0]
        nxdata["data"] = h5py.ExternalLink(scan.link, DETECTOR_DATASET)
        for axis, values in hkl.items():
            nxdata[f"hkl_{axis}"] = values
        for name, values in scan.motors().items():
            nxdata[name] = values
        for name, value in scan.constants.items():  # constant datasets beside the frames: not the scan axis
            nxdata[name] = np.full(n, value)
        diamond_scan = _group(entry, "diamond_scan", "NXcollection")
        keys = _group(diamond_scan, "keys", "NXcollection")
        keys["uniqueKeys"] = np.arange(1, n + 1, dtype=np.int32) if finished else np.zeros(n, dtype=np.int32)
        diamond_scan["scan_finished"] = np.array([1 if finished else 0], dtype=np.int32)
        diamond_scan["scan_shape"] = np.array([n], dtype=np.int32)
        diamond_scan["scan_command"] = scan.scan_command()
    return scan.nxs_path


def write_gda8(scan: I16Scan) -> Path:
    """A finished GDA 8 scan file: `entry1/measurement` with `@axes = [h]`, `scan_dimensions`, an external link."""
    write_detector_file(scan)
    n = scan.n_frames
    hkl = scan.hkl()
    with h5py.File(scan.nxs_path, "w") as handle:
        entry = _group(handle, "entry1", "NXentry")
        entry.attrs["default"] = "measurement"
        entry["scan_command"] = scan.scan_command()
        entry["scan_dimensions"] = np.array([n], dtype=np.int32)
        entry["start_time"] = "2019-03-01T10:00:00"
        entry["end_time"] = "2019-03-01T10:01:00"
        instrument = _group(entry, "instrument", "NXinstrument")
        detector = _group(instrument, scan.detector, "NXdetector")
        detector["data"] = h5py.ExternalLink(scan.link, DETECTOR_DATASET)
        detector["count_time"] = np.full(n, scan.constants["count_time"])
        measurement = _group(entry, "measurement", "NXdata")
        measurement.attrs["signal"] = "sum"
        if scan.axes:
            measurement.attrs["axes"] = [scan.gda8_axis or ("h" if scan.hkl_scan else scan.scanned)]
        for name, values in {**scan.motors(), **hkl}.items():
            measurement[name] = values
        for name, value in scan.constants.items():
            measurement[name] = np.full(n, value)
        measurement["sum"] = np.arange(n, dtype=np.float64)
        nxdata = _group(entry, scan.detector, "NXdata")
        nxdata.attrs["signal"] = "data"
        nxdata["data"] = h5py.ExternalLink(scan.link, DETECTOR_DATASET)
    return scan.nxs_path
