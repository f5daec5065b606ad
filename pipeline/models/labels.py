"""Frames people labelled, in DiPID's format (a Zooniverse classification export): read, pair with scans, write.

Why: DiPID's models were trained on peak outlines people drew on I16 frames, exported from
Zooniverse as a CSV. Reading that CSV the way DiPID did lets the pipeline fine-tune and evaluate on
real labels; writing the pipeline's own masks in the same format lets a labeller correct them in the
same tools and hand them back (see the design notes, "Labelled frames (DiPID's format)").

The format: columns `classification_id, subject_data, annotations, subject_ids`. `subject_data` is
JSON keyed by the subject id, whose `"Image Number"` is `"<scan number>-<frame index>"` (0-based
into the frames of `<scan number>.nxs`). `annotations` is a JSON list of tasks: `T1` the peak count
(a string; DiPID's CSV also has "more than 3"), `T3` the closed polygons, points `{"x": column,
"y": row}` in frame pixels. One image can have several classifications (different people).

Pixels, as DiPID rasterised them: pixel (row r, column c) is the point (x=c, y=r), and it belongs
to a polygon when `matplotlib.path.Path.contains_points(..., radius=0.5)` says so. matplotlib
applies that margin of 0.25 px outward or inward depending on the way round the polygon was drawn,
so polygons are used as drawn to give DiPID's masks exactly. Outlines made here
(`polygons_from_labels`) stay at least 0.35 px from every pixel centre, so they rasterise back to the
same pixels whichever way the margin goes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import contourpy
import numpy as np
from matplotlib.path import Path as PolygonPath

from pipeline.common.detector import FRAME_SHAPE
from pipeline.config import FollowSettings
from pipeline.errors import PipelineError, one_line, reporting
from pipeline.live.follow import ScanError, ScanFollower
from pipeline.models.card import sha256_of
from pipeline.store import StoreReader, schema

COLUMNS = ("classification_id", "subject_data", "annotations", "subject_ids")
COUNT_TASK, POLYGON_TASK = "T1", "T3"
COUNT_LABEL = "How many peaks are in this image?"  # DiPID's workflow's task labels, kept on export
POLYGON_LABEL = "Please draw a shape around each peak, as close to the exact shape of the peak as possible"
RADIUS = 0.5  # DiPID's contains_point(radius=0.5)
POLICY = "the one with the most polygons is kept (ties: the lowest classification_id)"
SOURCES = {"tlm": schema.TLM_LABELS, "volume": schema.VOLUME_LABELS}

_IMAGE_NUMBER = re.compile(r"^([^/\\]+)-([0-9]+)$")
_LEVEL = 0.5 - 1e-6  # just under half: diagonal neighbours of one instance stay in one outline


class LabelsError(PipelineError, ValueError):
    """A labels CSV (or store to export) that cannot be used; the message is one line naming file, row and field."""

    exit_code = 2


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Classification:
    """One person's labels of one image (one CSV row); compared by identity, as it holds arrays."""

    classification_id: int
    subject_id: str
    scan: str
    frame: int
    peak_count: int | None
    """T1 as a whole number; None where T1 is missing or not a number (DiPID's "more than 3")."""
    polygons: tuple[np.ndarray, ...]
    """T3's polygons, each float64 (n, 2) of (x = column, y = row), n >= 3, as drawn."""
    dropped_polygons: int = 0
    """T3 polygons left out for having fewer than 3 points."""

    @property
    def image(self) -> str:
        """`<scan>-<frame>`, as the CSV's Image Number."""
        return f"{self.scan}-{self.frame}"


def read_classifications(csv_path: Path) -> list[Classification]:
    """Every row of a DiPID/Zooniverse CSV, in file order; a LabelsError naming file, row and field for a row that cannot be read.

    Rows are numbered from 1 after the header. Polygons with fewer than 3 points are dropped and
    counted in `Classification.dropped_polygons`.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in COLUMNS if name not in (reader.fieldnames or ())]
            if missing:
                raise LabelsError(f"{csv_path}: not a DiPID/Zooniverse labels CSV (no column {', '.join(missing)})")
            return [_classification(csv_path, number, row) for number, row in enumerate(reader, start=1)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LabelsError(f"{csv_path}: cannot read the labels CSV ({one_line(error)})") from None


def _classification(csv_path: Path, number: int, row: dict[str, Any]) -> Classification:
    def fail(column: str, problem: str) -> LabelsError:
        return LabelsError(f"{csv_path}: row {number}, {column}: {problem}")

    try:
        classification_id = int(str(row.get("classification_id") or "").strip())
    except ValueError:
        raise fail("classification_id", f"not a whole number: {row.get('classification_id')!r}") from None
    subject_data = _json(row.get("subject_data"), dict, lambda problem: fail("subject_data", problem))
    subject_id = str(row.get("subject_ids") or "").strip()
    if subject_id not in subject_data:
        if len(subject_data) != 1:
            raise fail("subject_data", f"no entry for subject {subject_id!r}")
        subject_id = next(iter(subject_data))
    subject = subject_data[subject_id]
    image = subject.get("Image Number") if isinstance(subject, dict) else None
    if image is None:
        raise fail("subject_data", f"subject {subject_id} has no \"Image Number\"")
    match = _IMAGE_NUMBER.match(str(image).strip())
    if match is None:
        raise fail("subject_data", f"\"Image Number\" {image!r} is not \"<scan number>-<frame index>\"")
    annotations = _json(row.get("annotations"), list, lambda problem: fail("annotations", problem))
    tasks = {str(task.get("task")): task.get("value") for task in annotations if isinstance(task, dict)}
    polygons: list[np.ndarray] = []
    dropped = 0
    drawn = tasks.get(POLYGON_TASK) or []
    if not isinstance(drawn, list):
        raise fail("annotations", f"task {POLYGON_TASK} is not a list of polygons")
    for index, shape in enumerate(drawn):
        points = _points(shape)
        if points is None:
            raise fail("annotations", f"task {POLYGON_TASK} polygon {index}: points are not a list of finite {{\"x\", \"y\"}}")
        if len(points) < 3:
            dropped += 1
        else:
            points.setflags(write=False)
            polygons.append(points)
    return Classification(classification_id=classification_id, subject_id=subject_id, scan=match.group(1), frame=int(match.group(2)),
                          peak_count=_count(tasks.get(COUNT_TASK)), polygons=tuple(polygons), dropped_polygons=dropped)


def _json(text: Any, kind: type, fail: Callable[[str], LabelsError]) -> Any:
    try:
        value = json.loads(text or "")
    except ValueError as error:
        raise fail(f"not JSON ({one_line(error)})") from None
    if not isinstance(value, kind):
        raise fail(f"JSON {type(value).__name__}, expected a {'list' if kind is list else 'mapping'}")
    return value


def _points(shape: Any) -> np.ndarray | None:
    points = shape.get("points") if isinstance(shape, dict) else None
    if not isinstance(points, list):
        return None
    try:
        xy = np.array([(float(point["x"]), float(point["y"])) for point in points], dtype=np.float64).reshape(-1, 2)
    except (TypeError, KeyError, ValueError):
        return None
    return xy if np.isfinite(xy).all() else None


def _count(value: Any) -> int | None:
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() else None


# -- one classification per image --------------------------------------------------------------


class ChosenImages(dict[tuple[str, int], Classification]):
    """(scan, frame) -> the classification kept for that image; also says how many there were."""

    def __init__(self, chosen: dict[tuple[str, int], Classification], classifications: int, several: int) -> None:
        super().__init__(chosen)
        self.classifications = classifications
        self.several = several
        """Images that had more than one classification."""

    def summary(self) -> str:
        """What was done, in one line."""
        return (f"{self.classifications} classifications of {len(self)} images; {self.several} images with several "
                f"classifications: {POLICY}")


def choose_per_image(classifications: Iterable[Classification]) -> ChosenImages:
    """One classification per image: the one with the most polygons, ties to the lowest classification_id."""
    by_image: dict[tuple[str, int], list[Classification]] = defaultdict(list)
    total = 0
    for classification in classifications:
        by_image[(classification.scan, classification.frame)].append(classification)
        total += 1
    chosen = {image: min(group, key=lambda c: (-len(c.polygons), c.classification_id)) for image, group in by_image.items()}
    return ChosenImages(chosen, classifications=total, several=sum(len(group) > 1 for group in by_image.values()))


# -- polygons <-> instance labels --------------------------------------------------------------


def rasterise(polygons: Sequence[np.ndarray], shape: tuple[int, int] = FRAME_SHAPE) -> np.ndarray:
    """uint16 (rows, columns) instance labels: polygon i is id i + 1, as DiPID rasterised it (see the module docstring).

    Where polygons overlap, the earlier polygon keeps the pixel. Parts outside the frame are
    clipped; a polygon with no pixel centre inside (or fewer than 3 points) leaves its id unused.
    """
    if len(polygons) > np.iinfo(np.uint16).max:
        raise LabelsError(f"{len(polygons)} polygons: more than uint16 instance labels can hold")
    height, width = shape
    labels = np.zeros((height, width), dtype=np.uint16)
    for index, polygon in enumerate(polygons):
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(xy) < 3 or not np.isfinite(xy).all():
            continue
        col0, row0 = np.maximum(np.floor(xy.min(axis=0) - RADIUS).astype(int), 0)
        col1, row1 = np.ceil(xy.max(axis=0) + RADIUS).astype(int) + 1
        col1, row1 = min(col1, width), min(row1, height)
        if col0 >= col1 or row0 >= row1:
            continue
        cols, rows = np.meshgrid(np.arange(col0, col1, dtype=np.float64), np.arange(row0, row1, dtype=np.float64))
        inside = PolygonPath(xy).contains_points(np.column_stack([cols.ravel(), rows.ravel()]), radius=RADIUS)
        window = labels[row0:row1, col0:col1]
        window[inside.reshape(window.shape) & (window == 0)] = index + 1
    return labels


def polygons_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    """One closed outline per instance id (ids ascending), float64 (n, 2) of (x, y), n >= 3, first point not repeated.

    The outline runs half way between the instance's pixel centres and the others' (contourpy's
    marching squares), so `rasterise` gives the instance's pixels back. An instance in several
    pieces (or with holes) gets its largest outline, without the holes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise LabelsError(f"instance labels must be 2-D (rows, columns), got shape {labels.shape}")
    outlines = []
    for instance in np.unique(labels[labels > 0]).tolist():
        rows, cols = np.nonzero(labels == instance)
        row0, col0 = int(rows.min()), int(cols.min())
        mask = np.zeros((int(rows.max()) - row0 + 3, int(cols.max()) - col0 + 3), dtype=np.float64)
        mask[rows - row0 + 1, cols - col0 + 1] = 1.0  # a margin of one pixel: every outline closes
        lines = contourpy.contour_generator(z=mask, line_type=contourpy.LineType.Separate).lines(_LEVEL)
        candidates = [_tidy(np.asarray(line, dtype=np.float64)) for line in lines]
        candidates = [line for line in candidates if len(line) >= 3]
        if candidates:
            outlines.append(max(candidates, key=_area) + np.array([col0 - 1.0, row0 - 1.0]))
        else:  # not expected: the pixel squares' outline of the instance's box
            x0, y0, x1, y1 = col0 - 0.5, row0 - 0.5, cols.max() + 0.5, rows.max() + 0.5
            outlines.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64))
    return outlines


def _tidy(line: np.ndarray) -> np.ndarray:
    """A closed contourpy line without its repeated last point, on the half-pixel grid, without collinear points."""
    if len(line) > 1 and np.allclose(line[0], line[-1]):
        line = line[:-1]
    line = np.round(line * 2.0, 3) / 2.0
    keep = np.ones(len(line), dtype=bool)
    if len(line) > 3:
        before, after = line - np.roll(line, 1, axis=0), np.roll(line, -1, axis=0) - line
        cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        keep = np.abs(cross) > 1e-9
    return line[keep] if keep.sum() >= 3 else line


def _area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# -- pairing with scans ------------------------------------------------------------------------


@dataclass
class LabelledFrame:
    """One labelled image with its frame: raw counts as the file stores them (the follower's non-finite -> dead pixels) and labels."""

    scan: str
    frame: int
    counts: np.ndarray
    labels: np.ndarray
    """uint16 instance labels 1..n, `rasterise` of the chosen classification's polygons."""
    classification_id: int | None = None


@dataclass
class LabelledSet:
    """The labelled frames of one CSV paired with their scans, and what could not be paired."""

    frames: list[LabelledFrame]
    """Sorted by (scan, frame)."""
    unpaired: list[str]
    """One line per image that has no frame: which image and why."""
    csv_sha256: str
    images: int
    classifications: int
    several_classifications: int
    csv_path: Path = field(default_factory=Path)
    dropped_polygons: int = 0


def load_labelled_frames(csv_path: Path, scan_dir: Path, follow: FollowSettings | None = None) -> LabelledSet:
    """Each image of the CSV (one classification per image, see `choose_per_image`) with its frame of `<scan>.nxs` under `scan_dir`.

    Scan files are looked for anywhere under `scan_dir` and read with the pipeline's follower (any of
    I16's layouts), each opened once. An image whose scan is missing, ambiguous or unreadable, or
    whose frame is beyond the scan's end, is listed in `unpaired` with the reason.
    """
    csv_path, scan_dir = Path(csv_path), Path(scan_dir)
    if not scan_dir.is_dir():
        raise LabelsError(f"{scan_dir}: not a directory (where the labelled scans' .nxs files are)")
    classifications = read_classifications(csv_path)
    chosen = choose_per_image(classifications)
    settings = follow or FollowSettings()
    files: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(scan_dir.rglob("*.nxs")):
        if path.is_file():
            files[path.stem].append(path)
    by_scan: dict[str, list[Classification]] = defaultdict(list)
    for (scan, _frame), classification in sorted(chosen.items()):
        by_scan[scan].append(classification)
    frames: list[LabelledFrame] = []
    unpaired: list[str] = []
    for scan, wanted in sorted(by_scan.items()):
        found = files.get(scan, [])
        if len(found) != 1:
            why = (f"no scan file {scan}.nxs under {scan_dir}" if not found else
                   f"{len(found)} files named {scan}.nxs under {scan_dir} ({', '.join(str(p.relative_to(scan_dir)) for p in found)})")
            unpaired.extend(f"{c.image}: {why}" for c in wanted)
            continue
        _pair_scan(found[0], wanted, settings, frames, unpaired)
    return LabelledSet(frames=frames, unpaired=unpaired, csv_sha256=sha256_of(csv_path), images=len(chosen),
                       classifications=chosen.classifications, several_classifications=chosen.several, csv_path=csv_path,
                       dropped_polygons=sum(c.dropped_polygons for c in classifications))


def _pair_scan(path: Path, wanted: list[Classification], settings: FollowSettings, frames: list[LabelledFrame],
               unpaired: list[str]) -> None:
    """Read the wanted frames of one scan file, opened once."""
    with ScanFollower(path, settings) as follower:
        try:
            follower.open()
        except ScanError as error:
            unpaired.extend(f"{c.image}: {one_line(error)}" for c in wanted)
            return
        total = follower.frames_in_file
        for classification in wanted:
            if classification.frame >= total:
                unpaired.append(f"{classification.image}: frame {classification.frame} is beyond the scan's {total} frames ({path})")
                continue
            try:
                counts = follower.read_frame(classification.frame)
            except ScanError as error:
                unpaired.append(f"{classification.image}: {one_line(error)}")
                continue
            shape = (int(counts.shape[-2]), int(counts.shape[-1]))
            frames.append(LabelledFrame(scan=classification.scan, frame=classification.frame, counts=counts,
                                        labels=rasterise(classification.polygons, shape), classification_id=classification.classification_id))


# -- export ------------------------------------------------------------------------------------


def export_store(store_path: Path, out_csv: Path, source: str = "tlm") -> int:
    """Every done frame of a scan's store as one row of a DiPID/Zooniverse CSV (frames without peaks too); returns rows written.

    `source` "tlm" exports `tlm/labels` (the TLM's instances), "volume" `volume/labels` (the 3D
    peaks' footprints per frame). Ids are made up: classification and subject id = frame index + 1.
    """
    if source not in SOURCES:
        raise LabelsError(f"source {source!r}: expected one of {', '.join(SOURCES)}")
    reader = StoreReader(Path(store_path))
    array = reader.array(SOURCES[source])
    if array is None:
        raise LabelsError(f"{reader.path}: no {SOURCES[source]} to export")
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(f".{out_csv.name}.partial")
    rows = 0
    try:
        with open(partial, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for frame in reader.done_frames().tolist():
                if frame < array.shape[0]:
                    writer.writerow(_row(reader.name, frame, polygons_from_labels(np.asarray(array[frame])), str(reader.path.resolve())))
                    rows += 1
        os.replace(partial, out_csv)
    except OSError as error:
        raise LabelsError(f"{out_csv}: cannot write the labels CSV ({one_line(error)})") from None
    finally:
        partial.unlink(missing_ok=True)
    return rows


def _row(scan: str, frame: int, polygons: list[np.ndarray], source: str) -> list[str]:
    identifier = frame + 1
    image = f"{scan}-{frame}"
    subject = {str(identifier): {"Image Number": image, "source": source, "png": f"{image}.png"}}
    shapes = [{"tool": 0, "frame": 0, "closed": True, "points": [{"x": round(x, 4), "y": round(y, 4)} for x, y in polygon.tolist()],
               "details": [], "tool_label": "Polygon"} for polygon in polygons]
    annotations = [{"task": COUNT_TASK, "task_label": COUNT_LABEL, "value": str(len(polygons))},
                   {"task": POLYGON_TASK, "task_label": POLYGON_LABEL, "value": shapes}]
    return [str(identifier), json.dumps(subject), json.dumps(annotations), str(identifier)]


# -- the command line --------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    rows = export_store(args.store, args.out, args.source)
    print(f"{rows} rows written to {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    labelled = load_labelled_frames(args.csv, args.scan_dir)
    print(f"{labelled.classifications} classifications of {labelled.images} images in {args.csv}")
    print(f"{labelled.several_classifications} images with several classifications: {POLICY}")
    if labelled.dropped_polygons:
        print(f"{labelled.dropped_polygons} polygons with fewer than 3 points left out")
    print(f"{len(labelled.frames)} frames paired with scans under {args.scan_dir}")
    if labelled.unpaired:
        print(f"{len(labelled.unpaired)} images not paired:")
        for line in labelled.unpaired:
            print(f"  {line}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `labels export` and `labels check` on the `pipeline` command line."""
    labels = subparsers.add_parser("labels", help="labelled frames in DiPID's format (a Zooniverse export): export a store's masks, check a CSV",
                                   description="Read and write peak outlines as DiPID's Zooniverse classification CSV.")
    actions = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="a store's instance masks as a DiPID/Zooniverse CSV, one row per done frame",
                                description="Write one row per done frame of the store (frames without peaks too, with T1 \"0\"): "
                                            "each instance's outline as a T3 polygon, in DiPID's format, for labellers to correct.")
    export.add_argument("store", type=Path, metavar="SCAN.zarr", help="a scan's store (live or finished)")
    export.add_argument("--out", type=Path, required=True, metavar="CSV", help="the CSV to write")
    export.add_argument("--source", choices=sorted(SOURCES), default="tlm",
                        help="tlm: the TLM's instances (tlm/labels, default); volume: the 3D peaks per frame (volume/labels)")
    export.set_defaults(func=reporting("labels export", cmd_export))
    check = actions.add_parser("check", help="read a labels CSV and pair its images with scan files",
                               description=f"Count classifications and images, choose one classification per image ({POLICY}), "
                                           "and pair each image with its frame in <scan>.nxs under --scan-dir; every image "
                                           "that cannot be paired is listed with the reason.")
    check.add_argument("csv", type=Path, metavar="CSV", help="a DiPID/Zooniverse classification export")
    check.add_argument("--scan-dir", type=Path, required=True, metavar="DIR", help="where the scans' .nxs files are (searched recursively)")
    check.set_defaults(func=reporting("labels check", cmd_check))
