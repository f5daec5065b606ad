"""A beamline stand-in: writes simulated scans live, frame by frame, in I16's three file layouts.

The daemon must follow files that other processes are still writing, so the simulator writes
them the way the beamline does, with real processes and real SWMR files:

- ``gda9``: a "GDA" process writes ``<scan>.nxs`` (SWMR) whose detector data is an external link
  to ``<scan>-pilatus3_100k-files/<scan>.hdf``, written (SWMR) by a separate "detector" process.
  ``entry/diamond_scan/keys/uniqueKeys[i]`` turns non-zero only after the detector said frame
  ``i`` is flushed; ``scan_finished`` turns 1 at the end.
- ``gda8``: the ``.nxs`` is written once at the start (not SWMR) with external links to the same
  kind of detector file; ``entry1/end_time`` is added when the scan ends. No keys, no flag.
- ``nexus``: one process writes the frames inside ``<scan>.nxs`` (SWMR); a pre-created fixed-length
  ``entry1/end_time`` is filled at the end.

Beside each scan, ``<scan>.truth.h5`` holds the ground truth (3D peak id per pixel, peak table),
written by the process that writes the frames, frame by frame. Frames come from
:class:`pipeline.simulator.synth.RockingScan`, so ``RockingScan(n_frames, seed, settings, n_peaks).frame(i)``
reproduces any frame exactly.

The writer processes tell each other about frames over local pipes with fixed-size binary
messages (struct), not pickle; the plan itself reaches the spawned children the usual
multiprocessing way, inside this machine, at start.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import multiprocessing.connection
import signal
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.common.argtypes import non_negative_int, positive_float, positive_int
from pipeline.simulator.synth import FRAME_SHAPE, RockingScan, SynthSettings

LAYOUTS: tuple[str, ...] = ("gda9", "gda8", "nexus")
DETECTOR_NAME = "pil3_100k"
DETECTOR_DATASET = "/entry/instrument/detector/data"
END_TIME_DTYPE = "S32"

_MESSAGE = struct.Struct("<ii")  # (kind, frame index or frame count)
_READY, _FLUSHED, _DONE = 1, 2, 3
_FRAME_CHUNKS = (1, *FRAME_SHAPE)
_TRUTH_COUNT_EVERY_S = 0.05  # with repeated frames, the truth file's frames_written lags the detector by at most this
DISTINCT_FRAMES_ATTR = "distinct_frames"  # truth file attribute: frame i's truth is row i % this (ScanPlan.distinct_frames)


@dataclass
class ScanPlan:
    """What to simulate: where, which layout, how many frames, how fast, and how it ends."""

    directory: Path
    name: str
    layout: str
    n_frames: int
    rate_hz: float = 10.0
    seed: int = 0
    link_delay_s: float = 0.0
    """gda9/gda8: the detector file only appears this long after the .nxs."""
    abandon_after: int | None = None
    """Stop after this many frames with no end marker, as if GDA crashed (the processes exit)."""
    settings: SynthSettings = field(default_factory=SynthSettings)
    n_peaks: int | None = None
    end_marker_lead: int = 0
    """The end marker (scan_finished, end_time) is written this many frames before the detector flushes its
    last frame, as when the scan file's writer runs ahead of the detector's own writer."""
    distinct_frames: int | None = None
    """Synthesise only this many frames and write them over and over (frame i is frame i % distinct_frames, its
    truth too): a detector faster than the synthesis (~7 ms a frame of Poisson noise), for measuring the daemon."""

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not self.name or "/" in self.name or "\\" in self.name:
            raise ValueError(f"scan name must be a plain file name, got {self.name!r}")
        if self.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}")
        if not self.rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {self.rate_hz}")
        if self.link_delay_s < 0:
            raise ValueError(f"link_delay_s must be >= 0, got {self.link_delay_s}")
        if self.abandon_after is not None and self.abandon_after < 0:
            raise ValueError(f"abandon_after must be >= 0, got {self.abandon_after}")
        if not 0 <= self.end_marker_lead < self.n_frames:
            raise ValueError(f"end_marker_lead must be in 0..n_frames-1, got {self.end_marker_lead}")
        if self.distinct_frames is not None and self.distinct_frames < 1:
            raise ValueError(f"distinct_frames must be >= 1, got {self.distinct_frames}")

    @property
    def end_marker_after(self) -> int:
        """The frame after whose flush the end marker is written."""
        return self.n_frames - 1 - self.end_marker_lead

    @property
    def nxs_path(self) -> Path:
        return self.directory / f"{self.name}.nxs"

    @property
    def truth_path(self) -> Path:
        return self.directory / f"{self.name}.truth.h5"

    @property
    def detector_link(self) -> str:
        """The external link's file name, relative to the .nxs directory (as GDA writes it)."""
        return f"{self.name}-pilatus3_100k-files/{self.name}.hdf"

    @property
    def detector_path(self) -> Path:
        """The detector's own file (gda9/gda8); nexus keeps frames in the .nxs."""
        return self.directory / self.detector_link

    @property
    def frames_to_write(self) -> int:
        return self.n_frames if self.abandon_after is None else min(self.abandon_after, self.n_frames)

    @property
    def scan_command(self) -> str:
        start = RockingScan.AXIS_START
        stop = start + RockingScan.AXIS_STEP * (self.n_frames - 1)
        return (f"scan eta {round(start, 6)!r} {round(stop, 6)!r} {round(RockingScan.AXIS_STEP, 6)!r} "
                f"{DETECTOR_NAME} 1")

    def rocking_scan(self) -> RockingScan:
        """The deterministic generator behind this scan's frames and truth."""
        return RockingScan(self.n_frames, self.seed, self.settings, self.n_peaks)


# --------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


def _nx_group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.require_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _send(connection: multiprocessing.connection.Connection | None, kind: int, value: int) -> None:
    """Best effort: if the other process has died, carry on (a detector keeps writing without GDA)."""
    if connection is None:
        return
    try:
        connection.send_bytes(_MESSAGE.pack(kind, value))
    except (BrokenPipeError, OSError):
        pass


def _receive(connection: multiprocessing.connection.Connection) -> tuple[int, int] | None:
    """Next message, or None once the other side has gone (finished or crashed)."""
    try:
        return _MESSAGE.unpack(connection.recv_bytes(_MESSAGE.size))
    except (EOFError, OSError):
        return None


def _wait_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _frame_dataset(group: h5py.Group, name: str) -> h5py.Dataset:
    return group.create_dataset(name, shape=(0, *FRAME_SHAPE), maxshape=(None, *FRAME_SHAPE),
                                dtype=np.int32, chunks=_FRAME_CHUNKS)


def _append(dataset: h5py.Dataset, index: int, value: np.ndarray | float) -> None:
    dataset.resize(index + 1, axis=0)
    dataset[index] = value


def _append_frame(dataset: h5py.Dataset, index: int, counts: np.ndarray) -> None:
    """A frame written as its chunk's bytes (H5Dwrite_chunk), as detector file writers (Odin, the Eiger's) do: no
    selection or conversion in HDF5, ~3x less CPU than `dataset[index] = counts` (docs/performance.md). The chunk is one
    uncompressed frame, so its bytes are the frame's."""
    dataset.resize(index + 1, axis=0)
    dataset.id.write_direct_chunk((index, 0, 0), np.ascontiguousarray(counts, dtype=dataset.dtype).data)


def _frames(plan: ScanPlan, scan: RockingScan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(counts, truth) of each frame to write, synthesised as it is needed or, with `distinct_frames`, all of those
    at once, here, before the first frame is written: a detector faster than the synthesis (~7 ms a frame) would
    otherwise write its first frames late and then in a burst, sharing the CPU with whatever reads the file."""
    if plan.distinct_frames is None:
        return (scan.frame(index) for index in range(plan.frames_to_write))
    bank = [scan.frame(index) for index in range(min(plan.distinct_frames, plan.frames_to_write))]
    return (bank[index % plan.distinct_frames] for index in range(plan.frames_to_write))


def _child_setup() -> None:
    """Children leave Ctrl-C to the parent, which stops them; avoids tracebacks from every process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------- truth file


class _TruthWriter:
    """``<scan>.truth.h5``, in SWMR mode so that it stays readable even if the writer is killed."""

    def __init__(self, plan: ScanPlan, scan: RockingScan) -> None:
        self.file = h5py.File(plan.truth_path, "w", libver="latest")
        self.file.attrs["seed"] = plan.seed
        self.file.attrs["layout"] = plan.layout
        self.file.attrs["n_frames"] = plan.n_frames
        self.file.attrs["n_peaks_requested"] = -1 if plan.n_peaks is None else plan.n_peaks
        self.file.attrs["generator"] = "pipeline.simulator.synth.RockingScan(n_frames, seed, settings, n_peaks)"
        self.distinct_frames = plan.distinct_frames
        if plan.distinct_frames is not None:  # frame i is frame i % distinct_frames: only those rows are written
            self.file.attrs[DISTINCT_FRAMES_ATTR] = plan.distinct_frames
        self.labels = self.file.create_dataset(
            "labels", shape=(plan.n_frames, *FRAME_SHAPE), dtype=np.uint16,
            chunks=_FRAME_CHUNKS, compression="gzip", compression_opts=1, fillvalue=0)
        self.labels.attrs["dimensions"] = "frame,y,x"
        self.frames_written = self.file.create_dataset("frames_written", data=np.int32(0))
        self._written = 0
        self._count_due = 0.0
        peaks = self.file.create_group("peaks")
        columns = {
            "id": [p.id for p in scan.peaks],
            "first_frame": [p.first_frame for p in scan.peaks],
            "last_frame": [p.last_frame for p in scan.peaks],
            "centre_frame": [p.centre_frame for p in scan.peaks],
        }
        for name, values in columns.items():
            peaks.create_dataset(name, data=np.asarray(values, dtype=np.int32).reshape(-1))
        peaks.create_dataset("max_counts", data=np.asarray([p.max_counts for p in scan.peaks], dtype=np.float64))
        self.file.swmr_mode = True

    def write(self, index: int, truth: np.ndarray) -> None:
        if self.distinct_frames is None or index < self.distinct_frames:
            self.labels[index] = truth
            self.labels.flush()
            self._count(index + 1)
        elif time.monotonic() >= self._count_due:  # repeated frames: their rows exist; the count is a flush a frame
            self._count(index + 1)
        self._written = index + 1

    def _count(self, n: int) -> None:
        self.frames_written[()] = n
        self.frames_written.flush()
        self._count_due = time.monotonic() + _TRUTH_COUNT_EVERY_S

    def close(self) -> None:
        self._count(self._written)
        self.file.close()


# --------------------------------------------------------------------------- processes


def _detector_process(plan: ScanPlan, to_gda: multiprocessing.connection.Connection,
                      from_gda: multiprocessing.connection.Connection,
                      progress: ctypes.c_int) -> None:
    """The Pilatus' own HDF5 writer: ``<scan>.hdf`` in SWMR mode, one flushed frame at a time."""
    _child_setup()
    scan = plan.rocking_scan()
    frames = _frames(plan, scan)  # with distinct_frames, made now, while GDA makes the .nxs, not once the clock runs
    if _receive(from_gda) is None:  # GDA never created the .nxs
        return
    from_gda.close()
    _wait_until(time.monotonic() + plan.link_delay_s)
    plan.detector_path.parent.mkdir(parents=True, exist_ok=True)
    truth = _TruthWriter(plan, scan)
    with h5py.File(plan.detector_path, "w", libver="latest") as handle:
        entry = _nx_group(handle, "entry", "NXentry")
        instrument = _nx_group(entry, "instrument", "NXinstrument")
        detector = _nx_group(instrument, "detector", "NXdetector")
        data = _frame_dataset(detector, "data")
        handle.swmr_mode = True
        start = time.monotonic()
        for index, (counts, labels) in enumerate(frames):
            _wait_until(start + index / plan.rate_hz)
            _append_frame(data, index, counts)
            data.flush()
            handle.flush()
            truth.write(index, labels)
            progress.value = index + 1
            _send(to_gda, _FLUSHED, index)
    truth.close()
    if plan.abandon_after is None:
        _send(to_gda, _DONE, plan.n_frames)
    to_gda.close()


def _gda9_process(plan: ScanPlan, from_detector: multiprocessing.connection.Connection,
                  to_detector: multiprocessing.connection.Connection) -> None:
    """GDA 9: SWMR .nxs; a key turns non-zero only once the detector reported that frame flushed."""
    _child_setup()
    n = plan.n_frames
    axis = RockingScan.axis_for(plan.n_frames)
    handle = h5py.File(plan.nxs_path, "w", libver="latest")
    try:
        entry = _nx_group(handle, "entry", "NXentry")
        entry.create_dataset("start_time", data=_now())
        entry.create_dataset("end_time", data=np.bytes_(b""), dtype=END_TIME_DTYPE)
        instrument = _nx_group(entry, "instrument", "NXinstrument")
        detector = _nx_group(instrument, DETECTOR_NAME, "NXdetector")
        detector["data"] = h5py.ExternalLink(plan.detector_link, DETECTOR_DATASET)
        nxdata = _nx_group(entry, DETECTOR_NAME, "NXdata")
        nxdata.attrs["signal"] = "data"
        nxdata.attrs["axes"] = ["eta", ".", "."]
        nxdata.attrs["eta_indices"] = 0
        nxdata["data"] = h5py.ExternalLink(plan.detector_link, DETECTOR_DATASET)
        eta = nxdata.create_dataset("eta", shape=(n,), dtype=np.float64, chunks=(min(n, 4096),),
                                    fillvalue=np.nan)
        eta.attrs["units"] = "deg"
        diamond_scan = _nx_group(entry, "diamond_scan", "NXcollection")
        keys = _nx_group(diamond_scan, "keys", "NXcollection").create_dataset(
            "uniqueKeys", shape=(n,), dtype=np.int32, chunks=(min(n, 4096),), fillvalue=0)
        finished = diamond_scan.create_dataset("scan_finished", data=np.zeros(1, dtype=np.int32),
                                               maxshape=(1,), chunks=(1,))
        diamond_scan.create_dataset("scan_shape", data=np.array([n], dtype=np.int32))
        diamond_scan.create_dataset("scan_command", data=plan.scan_command)
        handle.swmr_mode = True
        _send(to_detector, _READY, 0)
        to_detector.close()
        completed = marked = False

        def mark_finished() -> None:
            finished[0] = 1
            finished.flush()
            entry["end_time"][()] = np.bytes_(_now().encode())
            handle.flush()

        keys_now = np.zeros(n, dtype=np.int32)
        eta_now = np.full(n, np.nan)
        while (message := _receive(from_detector)) is not None:
            flushed: list[int] = []  # every frame reported so far, keyed with one write and flush (a detector
            while message is not None:  # faster than GDA is reported in batches, as GDA's own writer does)
                kind, value = message
                if kind != _FLUSHED:
                    break
                if plan.end_marker_lead and value == plan.end_marker_after and plan.abandon_after is None:
                    _publish_keys(keys, eta, keys_now, eta_now, flushed)
                    flushed = []
                    mark_finished()  # before this frame's key: the keys of the last frames are still zero
                    marked = True
                flushed.append(value)
                keys_now[value], eta_now[value] = value + 1, axis[value]
                message = _receive(from_detector) if from_detector.poll(0) else None
            _publish_keys(keys, eta, keys_now, eta_now, flushed)
            if message is not None and message[0] == _DONE:
                completed = True
                break
        if completed and not marked:
            mark_finished()
    finally:
        handle.close()


def _publish_keys(keys: h5py.Dataset, eta: h5py.Dataset, keys_now: np.ndarray, eta_now: np.ndarray,
                  frames: list[int]) -> None:
    """Write the eta and uniqueKeys of `frames` (eta first: a reader trusts a frame once its key is set)."""
    if not frames:
        return
    block = slice(min(frames), max(frames) + 1)
    eta[block] = eta_now[block]
    eta.flush()
    keys[block] = keys_now[block]
    keys.flush()


def _gda8_process(plan: ScanPlan, from_detector: multiprocessing.connection.Connection,
                  to_detector: multiprocessing.connection.Connection) -> None:
    """GDA 8: the .nxs is written once, closed, and reopened at the end only to add end_time."""
    _child_setup()
    axis = RockingScan.axis_for(plan.n_frames)
    with h5py.File(plan.nxs_path, "w") as handle:
        entry = _nx_group(handle, "entry1", "NXentry")
        entry.create_dataset("scan_command", data=plan.scan_command)
        entry.create_dataset("start_time", data=_now())
        instrument = _nx_group(entry, "instrument", "NXinstrument")
        _nx_group(instrument, DETECTOR_NAME, "NXdetector")["data"] = h5py.ExternalLink(
            plan.detector_link, DETECTOR_DATASET)
        nxdata = _nx_group(entry, DETECTOR_NAME, "NXdata")
        nxdata.attrs["signal"] = "data"
        nxdata["data"] = h5py.ExternalLink(plan.detector_link, DETECTOR_DATASET)
        measurement = _nx_group(entry, "measurement", "NXdata")
        measurement.attrs["axes"] = "eta"
        measurement.create_dataset("eta", data=axis).attrs["units"] = "deg"
    _send(to_detector, _READY, 0)
    to_detector.close()
    completed = marked = False

    def add_end_time() -> None:
        # locking=False: a follower holding the file open for reading must not make this fail.
        with h5py.File(plan.nxs_path, "a", locking=False) as handle:
            handle["entry1"].create_dataset("end_time", data=_now())

    while (message := _receive(from_detector)) is not None:
        kind, value = message
        if kind == _FLUSHED and plan.end_marker_lead and value == plan.end_marker_after and plan.abandon_after is None:
            add_end_time()  # while the detector still has frames to write
            marked = True
        if kind == _DONE:
            completed = True
            break
    if completed and not marked:
        add_end_time()


def _nexus_process(plan: ScanPlan, progress: ctypes.c_int) -> None:
    """DiPID-era file: one SWMR process appends frames and eta inside the .nxs, end_time at the end."""
    _child_setup()
    scan = plan.rocking_scan()
    frames = _frames(plan, scan)  # with distinct_frames, made before the file appears
    with h5py.File(plan.nxs_path, "w", libver="latest") as handle:
        entry = _nx_group(handle, "entry1", "NXentry")
        entry.create_dataset("scan_command", data=plan.scan_command)
        entry.create_dataset("start_time", data=_now())
        end_time = entry.create_dataset("end_time", data=np.bytes_(b""), dtype=END_TIME_DTYPE)
        instrument = _nx_group(entry, "instrument", "NXinstrument")
        _nx_group(instrument, DETECTOR_NAME, "NXdetector")
        nxdata = _nx_group(entry, DETECTOR_NAME, "NXdata")
        nxdata.attrs["signal"] = "data"
        nxdata.attrs["axes"] = ["eta", ".", "."]
        nxdata.attrs["eta_indices"] = 0
        data = _frame_dataset(nxdata, "data")
        eta = nxdata.create_dataset("eta", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
        eta.attrs["units"] = "deg"
        truth = _TruthWriter(plan, scan)
        handle.swmr_mode = True
        start = time.monotonic()
        marked = False
        for index, (counts, labels) in enumerate(frames):
            _wait_until(start + index / plan.rate_hz)
            if plan.end_marker_lead and index == plan.end_marker_after + 1 and plan.abandon_after is None:
                end_time[()] = np.bytes_(_now().encode())  # the end marker before the last frames are written
                end_time.flush()
                marked = True
            _append_frame(data, index, counts)
            _append(eta, index, scan.axis_values[index])
            data.flush()
            eta.flush()
            truth.write(index, labels)
            progress.value = index + 1
        truth.close()
        if plan.abandon_after is None and not marked:
            end_time[()] = np.bytes_(_now().encode())
            end_time.flush()


# --------------------------------------------------------------------------- public API


class ScanWriter:
    """Runs a :class:`ScanPlan` in child processes ('spawn'), writing real files live."""

    def __init__(self, plan: ScanPlan) -> None:
        self.plan = plan
        self._context = multiprocessing.get_context("spawn")
        self._progress = self._context.Value("i", 0, lock=False)
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._killed = False

    def start(self) -> ScanWriter:
        """Start the writer processes and return at once; files appear as the processes get going."""
        if self._processes:
            raise RuntimeError("ScanWriter already started")
        plan = self.plan
        plan.directory.mkdir(parents=True, exist_ok=True)
        if plan.layout == "nexus":
            self._processes = [self._context.Process(
                target=_nexus_process, args=(plan, self._progress), name=f"nexus-{plan.name}", daemon=True)]
        else:
            gda_in, detector_out = self._context.Pipe(duplex=False)
            detector_in, gda_out = self._context.Pipe(duplex=False)
            gda_target = _gda9_process if plan.layout == "gda9" else _gda8_process
            self._processes = [
                self._context.Process(target=gda_target, args=(plan, gda_in, gda_out),
                                      name=f"gda-{plan.name}", daemon=True),
                self._context.Process(target=_detector_process, args=(plan, detector_out, detector_in, self._progress),
                                      name=f"detector-{plan.name}", daemon=True),
            ]
        for process in self._processes:
            process.start()
        if plan.layout != "nexus":
            for connection in (gda_in, detector_out, detector_in, gda_out):
                connection.close()  # only the children hold the ends now, so EOF reaches a survivor
        return self

    @property
    def pids(self) -> list[int]:
        """The writer processes' ids (for measuring what they cost)."""
        return [process.pid for process in self._processes if process.pid is not None]

    @property
    def frames_written(self) -> int:
        """Frames flushed so far (for progress bars)."""
        return int(self._progress.value)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the processes (at most ``timeout`` seconds in all); raise if one of them failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for process in self._processes:
            process.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        failed = [f"{p.name} exit code {p.exitcode}" for p in self._processes
                  if p.exitcode not in (None, 0) and not self._killed]
        if failed:
            raise RuntimeError(f"scan writer for {self.plan.name} failed: {', '.join(failed)}")

    def kill(self) -> None:
        """SIGKILL every writer process: a crashed beamline, files left as they are."""
        self._killed = True
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join()

    def is_alive(self) -> bool:
        return any(process.is_alive() for process in self._processes)


def write_scan(plan: ScanPlan) -> Path:
    """Write one whole scan (blocking) and return its .nxs path."""
    ScanWriter(plan).start().join()
    return plan.nxs_path


# --------------------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate", help="write simulated scans live, with ground truth (a beamline stand-in)",
        description="Write simulated Pilatus3 100K rocking scans frame by frame, as I16 does, in the "
                    "GDA 9, GDA 8 and DiPID-era NeXus layouts, each with <scan>.truth.h5 beside it. "
                    "Scans of one layout are written one after another; layouts run side by side.")
    parser.add_argument("--out", type=Path, default=Path("simulated"), metavar="DIR",
                        help="directory to write scans into (default: ./simulated)")
    parser.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all",
                        help="file layout (default: all)")
    parser.add_argument("--scans", type=positive_int, default=1, metavar="K", help="scans per layout (default: 1)")
    parser.add_argument("--frames", type=positive_int, default=50, metavar="N", help="frames per scan (default: 50)")
    parser.add_argument("--rate", type=positive_float, default=10.0, metavar="HZ",
                        help="frames per second (default: 10)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                        help="seed of the first scan of each layout; scan k uses S + k (default: 0)")
    parser.add_argument("--peaks", type=non_negative_int, default=None, metavar="N",
                        help="3D peaks per scan (default: drawn, about 1.6 present per frame)")
    parser.add_argument("--distinct-frames", type=positive_int, default=None, metavar="K",
                        help="synthesise only K frames and write them over and over (frame i is frame i %% K): a detector "
                             "faster than the synthesis, which takes ~7 ms a frame (default: every frame synthesised)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_simulate)


def _free_name(directory: Path, layout: str, start: int) -> tuple[str, int]:
    """First ``sim-<layout>-NNNN`` whose files do not exist yet, so reruns never overwrite a scan."""
    index = start
    while True:
        name = f"sim-{layout}-{index:04d}"
        if not (directory / f"{name}.nxs").exists() and not (directory / f"{name}.truth.h5").exists():
            return name, index
        index += 1


def run_simulate(args: argparse.Namespace) -> int:
    """Write ``--scans`` scans per layout; layouts in parallel, each layout's scans in sequence."""
    layouts = list(LAYOUTS) if args.layout == "all" else [args.layout]
    directory: Path = args.out
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"simulate: cannot create {directory}: {error.strerror}", file=sys.stderr)
        return 1
    show_progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    next_index = {layout: 0 for layout in layouts}
    remaining = {layout: args.scans for layout in layouts}
    active: dict[str, tuple[ScanWriter, Any]] = {}  # layout -> (writer, tqdm bar or None)

    def launch(layout: str, position: int) -> None:
        name, index = _free_name(directory, layout, next_index[layout])
        next_index[layout] = index + 1
        scan_number = args.scans - remaining[layout]
        remaining[layout] -= 1
        plan = ScanPlan(directory=directory, name=name, layout=layout, n_frames=args.frames,
                        rate_hz=args.rate, seed=args.seed + scan_number, n_peaks=args.peaks,
                        distinct_frames=getattr(args, "distinct_frames", None))
        print(f"{layout}: {plan.nxs_path}  truth: {plan.truth_path}", flush=True)
        bar = None
        if show_progress:
            from tqdm import tqdm
            bar = tqdm(total=plan.n_frames, desc=name, unit="frame", position=position, leave=True)
        active[layout] = (ScanWriter(plan).start(), bar)

    try:
        for position, layout in enumerate(layouts):
            launch(layout, position)
        while active:
            time.sleep(0.1)
            for position, layout in enumerate(layouts):
                if layout not in active:
                    continue
                writer, bar = active[layout]
                if bar is not None:
                    written = writer.frames_written
                    if bar.n == 0 and written:
                        bar.reset()  # time the frames, not the processes' start-up
                    bar.n = written
                    bar.refresh()
                if writer.is_alive():
                    continue
                writer.join()
                if bar is not None:
                    bar.close()
                del active[layout]
                if remaining[layout]:
                    launch(layout, position)
    except KeyboardInterrupt:
        for writer, _ in active.values():
            writer.kill()
        print("simulate: interrupted; the scans in progress were left unfinished", file=sys.stderr)
        return 130
    except RuntimeError as error:
        for writer, _ in active.values():
            writer.kill()
        print(f"simulate: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.simulator.writers`` works without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="pipeline")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
