"""Labelled frames in DiPID's format (`pipeline.models.labels`), on real files: DiPID's own rows
(tests/data/dipid_sample.csv), NeXus scans written by the simulator in all three layouts, and a
scan store written with zarr in the store's schema.

The round trips (instance labels -> outlines -> labels) are measured on the simulator's true
labels, whose peak shapes are DiPID's real outlines, and on hand-made hard cases: streaks, peaks
at the frame's edges and corners, small and tiny peaks, touching peaks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from matplotlib.path import Path as PolygonPath

from pipeline.common.detector import FRAME_SHAPE
from pipeline.models import labels as L
from pipeline.models.labels import LabelsError, choose_per_image, export_store, load_labelled_frames, polygons_from_labels, rasterise, read_classifications
from pipeline.simulator import synth
from pipeline.simulator.writers import DETECTOR_DATASET, DETECTOR_NAME, ScanPlan, ScanWriter
from pipeline.store import schema

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "dipid_sample.csv"
N_FRAMES = 20
LAYOUT_SCANS = {"gda9": "794673", "gda8": "794625", "nexus": "794916"}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def round_trip_ious(labels: np.ndarray, min_pixels: int = 5) -> list[tuple[float, int]]:
    """(IoU, pixels) of every instance of at least `min_pixels` after labels -> outlines -> labels."""
    outlines = polygons_from_labels(labels)
    ids = [int(i) for i in np.unique(labels) if i]
    assert len(outlines) == len(ids)
    back = rasterise(outlines, labels.shape)
    results = []
    for number, instance in enumerate(ids, start=1):
        assert outlines[number - 1].shape[1] == 2 and len(outlines[number - 1]) >= 3
        mask = labels == instance
        if mask.sum() >= min_pixels:
            results.append((iou(mask, back == number), int(mask.sum())))
    return results


def dipid_mask(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """DiPID's own rasterisation (its dataset's make_mask): a Python loop over pixels, `(column, row)` per pixel,
    here only over the polygon's box so the test stays quick."""
    path = PolygonPath([tuple(point) for point in polygon.tolist()])
    mask = np.zeros(shape, dtype=bool)
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 2
    for column in range(max(x0, 0), min(x1, shape[1])):
        for row in range(max(y0, 0), min(y1, shape[0])):
            if path.contains_point((column, row), radius=0.5):
                mask[row, column] = True
    return mask


def csv_row(classification_id: int, image: str, polygons: list[np.ndarray], subject_id: int | None = None) -> list[str]:
    """A row as DiPID's export writes it (the keys of its real rows)."""
    subject = str(subject_id or classification_id)
    shapes = [{"tool": 0, "frame": 0, "closed": True, "points": [{"x": x, "y": y} for x, y in p.tolist()], "details": [],
               "tool_label": "Polygon"} for p in polygons]
    annotations = [{"task": "T1", "task_label": "How many peaks are in this image?", "value": str(len(polygons))}]
    if polygons:
        annotations.append({"task": "T3", "task_label": "Please draw a shape around each peak", "value": shapes})
    subject_data = {subject: {"retired": None, "png": f"{image}.png", "log_png": f"log-{image}.png", "Image Number": image}}
    return [str(classification_id), json.dumps(subject_data), json.dumps(annotations), subject]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(L.COLUMNS)
        writer.writerows(rows)
    return path


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)


# -- reading DiPID's rows ----------------------------------------------------------------------


def test_reads_dipids_rows():
    classifications = read_classifications(SAMPLE)
    assert len(classifications) == 12
    assert len({(c.scan, c.frame) for c in classifications}) == 8
    assert sum(len(c.polygons) for c in classifications) == 20
    assert sum(c.dropped_polygons for c in classifications) == 0
    first = classifications[0]
    assert (first.classification_id, first.subject_id, first.scan, first.frame, first.peak_count) == (501906814, "90800803", "794673", 14, 2)
    assert first.polygons[0].dtype == np.float64 and first.polygons[0].shape == (7, 2)
    np.testing.assert_allclose(first.polygons[0][0], [378.4087829589844, 143.58251953125])
    by_id = {c.classification_id: c for c in classifications}
    assert by_id[501910825].peak_count is None and len(by_id[501910825].polygons) == 5  # T1 "more than 3"
    assert by_id[501915377].peak_count == 0 and by_id[501915377].polygons == ()  # T1 "0", no T3 task
    assert by_id[502351722].peak_count == 0 and by_id[502351722].polygons == ()
    assert [c.peak_count for c in classifications] == [2, 3, 1, 2, None, 0, 3, 1, 1, 1, 1, 0]


def test_one_classification_per_image():
    chosen = choose_per_image(read_classifications(SAMPLE))
    assert len(chosen) == 8
    assert (chosen.classifications, chosen.several) == (12, 3)
    assert chosen[("794673", 14)].classification_id == 501906814  # 2 polygons over an empty classification
    assert chosen[("794661", 49)].classification_id == 501918785  # 3 polygons over 2, though classified later
    assert chosen[("794916", 11)].classification_id == 501930516  # three with one polygon each: the lowest id
    assert chosen.summary() == ("12 classifications of 8 images; 3 images with several classifications: "
                                "the one with the most polygons is kept (ties: the lowest classification_id)")


def test_short_polygons_are_dropped_and_counted(tmp_path):
    polygons = [np.array([[1.0, 1.0], [5.0, 1.0]]), np.array([[1.0, 1.0], [5.0, 1.0], [5.0, 5.0]])]
    [classification] = read_classifications(write_csv(tmp_path / "short.csv", [csv_row(7, "1234-3", polygons)]))
    assert len(classification.polygons) == 1 and classification.dropped_polygons == 1


@pytest.mark.parametrize("row, field, problem", [
    (["1", "{not json", "[]", "5"], "subject_data", "not JSON"),
    (["1", json.dumps({"5": {"png": "x.png"}}), "[]", "5"], "subject_data", 'has no "Image Number"'),
    (["1", json.dumps({"5": {"Image Number": "794673_14"}}), "[]", "5"], "subject_data", "is not \"<scan number>-<frame index>\""),
    (["1", json.dumps({"5": {"Image Number": "794673-x"}}), "[]", "5"], "subject_data", "is not \"<scan number>-<frame index>\""),
    (["x", json.dumps({"5": {"Image Number": "794673-1"}}), "[]", "5"], "classification_id", "not a whole number"),
    (["1", json.dumps({"5": {"Image Number": "794673-1"}}), "[{", "5"], "annotations", "not JSON"),
    (["1", json.dumps({"5": {"Image Number": "794673-1"}}), json.dumps([{"task": "T3", "value": [{"points": [{"x": 1}]}]}]), "5"],
     "annotations", "polygon 0"),
])
def test_a_broken_row_names_file_row_and_field(tmp_path, row, field, problem):
    path = write_csv(tmp_path / "broken.csv", [csv_row(3, "794673-2", []), row])
    with pytest.raises(LabelsError) as caught:
        read_classifications(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: row 2, {field}: ") and problem in message and "\n" not in message
    assert caught.value.exit_code == 2


def test_not_a_labels_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("classification_id,subject_data\n1,{}\n")
    with pytest.raises(LabelsError, match=r"x.csv: not a DiPID/Zooniverse labels CSV \(no column annotations, subject_ids\)"):
        read_classifications(path)
    with pytest.raises(LabelsError, match="cannot read the labels CSV"):
        read_classifications(tmp_path / "missing.csv")


# -- rasterising -------------------------------------------------------------------------------


def test_a_square_gives_exactly_its_pixels():
    square = np.array([[1.6, 2.6], [5.4, 2.6], [5.4, 6.4], [1.6, 6.4]])  # x = column, y = row
    expected = np.zeros(FRAME_SHAPE, dtype=np.uint16)
    expected[3:7, 2:6] = 1  # pixel centres (column, row) inside, both ways round
    for polygon in (square, square[::-1]):
        labels = rasterise([polygon])
        assert labels.dtype == np.uint16 and labels.shape == FRAME_SHAPE
        np.testing.assert_array_equal(labels, expected)


def test_clipped_at_the_frame_and_earlier_polygons_keep_their_pixels():
    outside = np.array([[-10.0, -5.0], [3.4, -5.0], [3.4, 2.4], [-10.0, 2.4]])
    beyond = np.array([[480.6, 190.6], [500.0, 190.6], [500.0, 200.0], [480.6, 200.0]])
    gone = np.array([[600.0, 10.0], [610.0, 10.0], [610.0, 20.0]])
    overlapping = np.array([[2.6, 0.6], [8.4, 0.6], [8.4, 4.4], [2.6, 4.4]])
    labels = rasterise([outside, beyond, gone, overlapping])
    assert np.count_nonzero(labels == 1) == 3 * 4 and (labels[0:3, 0:4] == 1).all()
    assert np.count_nonzero(labels == 2) == 4 * 6 and (labels[191:195, 481:487] == 2).all()
    assert not (labels == 3).any()  # entirely outside the frame: its id stays unused
    assert (labels[1:5, 3:9] > 0).all() and (labels[1:3, 3] == 1).all() and np.count_nonzero(labels == 4) == 4 * 6 - 2


def test_the_same_pixels_as_dipids_loop():
    """DiPID's own per-pixel loop (contains_point((column, row), radius=0.5)) on its real polygons."""
    checked = 0
    for classification in read_classifications(SAMPLE):
        labels = rasterise(classification.polygons)
        for number, polygon in enumerate(classification.polygons, start=1):
            earlier = (labels > 0) & (labels < number)
            np.testing.assert_array_equal(labels == number, dipid_mask(polygon, FRAME_SHAPE) & ~earlier)
            checked += 1
    assert checked == 20


# -- labels -> outlines -> labels --------------------------------------------------------------


def test_round_trip_on_simulator_truth():
    ious: list[tuple[float, int]] = []
    scan = synth.RockingScan(12, seed=5)
    for index in range(12):
        ious += round_trip_ious(scan.frame(index)[1])
    rng = np.random.default_rng(11)
    for _ in range(10):
        ious += round_trip_ious(synth.training_sample(rng)[1])
    assert len(ious) >= 15
    worst, pixels = min(ious)
    assert worst >= 0.95, f"minimum per-instance IoU {worst:.4f} (an instance of {pixels} px) over {len(ious)} instances"
    print(f"simulator truth: {len(ious)} instances, minimum IoU {worst:.4f}, median size {np.median([p for _, p in ious]):.0f} px")


def test_round_trip_on_dipids_outlines():
    ious: list[tuple[float, int]] = []
    for classification in read_classifications(SAMPLE):
        ious += round_trip_ious(rasterise(classification.polygons))
    worst, pixels = min(ious)
    assert worst >= 0.95, f"minimum per-instance IoU {worst:.4f} (an instance of {pixels} px)"
    print(f"DiPID's outlines: {len(ious)} instances, minimum IoU {worst:.4f}")


def test_round_trip_on_hard_shapes():
    labels = np.zeros(FRAME_SHAPE, dtype=np.uint16)
    rows, cols = np.mgrid[: FRAME_SHAPE[0], : FRAME_SHAPE[1]]
    labels[(rows - 60) ** 2 + (cols - 100) ** 2 <= 17.5 ** 2] = 1  # a 35 px disc
    for step in range(40):  # a streak 2 px wide, diagonal
        labels[150 - step, 200 + 2 * step: 202 + 2 * step] = 2
    labels[0:12, 470:487] = 3  # in the top right corner
    labels[90:120, 0:5] = 4  # along the left edge
    labels[180:195, 300:340] = 5  # along the bottom edge
    labels[20:27, 300:308] = 6  # small: 7 x 8
    labels[20:27, 308:316] = 7  # touching it
    for number, (row, col) in enumerate([(100, 250), (100, 260), (100, 270), (100, 280)], start=8):  # tiny: 1, 2, 3 and 4 px
        size = number - 7
        labels[row, col: col + min(size, 2)] = number
        if size > 2:
            labels[row + 1, col: col + size - 2] = number
    for step in range(6):  # one pixel wide, touching only at corners
        labels[130 + step, 400 + step] = 12
    ious = round_trip_ious(labels, min_pixels=1)
    assert len(ious) == 12
    assert min(ious)[0] >= 0.95, f"per-instance IoUs {[round(v, 3) for v, _ in ious]}"
    back = rasterise(polygons_from_labels(labels))
    np.testing.assert_array_equal(back, np.searchsorted(np.unique(labels), labels).astype(np.uint16))  # exactly, here
    print(f"hard shapes: minimum IoU {min(ious)[0]:.4f}")


def test_outlines_of_nothing_and_of_one_pixel():
    assert polygons_from_labels(np.zeros((5, 5), dtype=np.uint16)) == []
    one = np.zeros((5, 5), dtype=np.uint32)
    one[0, 0] = 9
    [outline] = polygons_from_labels(one)
    assert len(outline) >= 3
    np.testing.assert_array_equal(rasterise([outline], (5, 5)), (one > 0).astype(np.uint16))
    with pytest.raises(LabelsError, match="2-D"):
        polygons_from_labels(np.zeros((2, 5, 5)))


# -- pairing with scans ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory) -> Path:
    """A scan per layout, written by the simulator (in parallel), each in its own folder; and two unreadable scans."""
    root = tmp_path_factory.mktemp("scans")
    plans = [ScanPlan(directory=root / layout / "sub", name=name, layout=layout, n_frames=N_FRAMES, rate_hz=1000.0, seed=index + 1)
             for index, (layout, name) in enumerate(LAYOUT_SCANS.items())]
    writers = [ScanWriter(plan).start() for plan in plans]
    for writer in writers:
        writer.join(timeout=120)
    (root / "broken").mkdir()
    (root / "broken" / "794700.nxs").write_bytes(b"this is not an HDF5 file\n")
    for folder in ("a", "b"):
        (root / folder).mkdir()
        (root / folder / "794701.nxs").write_bytes(b"not HDF5 either\n")
    return root


def frame_from_file(root: Path, layout: str, index: int) -> np.ndarray:
    """A frame read with h5py from the file that holds it, not through the pipeline."""
    name = LAYOUT_SCANS[layout]
    directory = root / layout / "sub"
    if layout == "nexus":
        with h5py.File(directory / f"{name}.nxs", "r") as handle:
            return handle[f"entry1/{DETECTOR_NAME}/data"][index]
    with h5py.File(directory / f"{name}-pilatus3_100k-files" / f"{name}.hdf", "r") as handle:
        return handle[DETECTOR_DATASET][index]


def truth_outlines(layout: str, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
    seed = list(LAYOUT_SCANS).index(layout) + 1
    truth = synth.RockingScan(N_FRAMES, seed).truth(index)
    return truth, polygons_from_labels(truth)


def pairing_csv(path: Path) -> Path:
    rows = []
    identifier = 100
    for layout, name in LAYOUT_SCANS.items():
        for index in (N_FRAMES - 1, 0, 7):
            identifier += 1
            rows.append(csv_row(identifier, f"{name}-{index}", truth_outlines(layout, index)[1]))
    rows.append(csv_row(90, f"{LAYOUT_SCANS['gda9']}-7", []))  # a second, empty classification of one image
    rows += [csv_row(201, "799999-3", []), csv_row(202, f"{LAYOUT_SCANS['gda8']}-{N_FRAMES + 5}", []),
             csv_row(203, "794700-1", []), csv_row(204, "794701-2", [])]
    return write_csv(path, rows)


def test_pairs_labelled_images_with_their_frames(scan_dir, tmp_path):
    path = pairing_csv(tmp_path / "pairing.csv")
    labelled = load_labelled_frames(path, scan_dir)
    assert (labelled.classifications, labelled.images, labelled.several_classifications) == (14, 13, 1)
    assert labelled.csv_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and labelled.csv_path == path
    assert [(f.scan, f.frame) for f in labelled.frames] == sorted((name, i) for name in LAYOUT_SCANS.values() for i in (0, 7, N_FRAMES - 1))
    ious = []
    for frame in labelled.frames:
        layout = next(layout for layout, name in LAYOUT_SCANS.items() if name == frame.scan)
        expected = frame_from_file(scan_dir, layout, frame.frame)
        assert frame.counts.dtype == expected.dtype
        np.testing.assert_array_equal(frame.counts, expected)
        truth, outlines = truth_outlines(layout, frame.frame)
        assert frame.labels.dtype == np.uint16
        np.testing.assert_array_equal(frame.labels, rasterise(outlines))
        for number, instance in enumerate(int(i) for i in np.unique(truth) if i):
            ious.append(iou(truth == instance, frame.labels == number + 1))
    assert ious and min(ious) >= 0.95, f"minimum IoU {min(ious):.4f}"
    assert labelled.frames[[(f.scan, f.frame) for f in labelled.frames].index((LAYOUT_SCANS["gda9"], 7))].classification_id == 103
    assert len(labelled.unpaired) == 4
    lines = dict(line.split(": ", 1) for line in labelled.unpaired)
    assert lines["799999-3"] == f"no scan file 799999.nxs under {scan_dir}"
    assert lines[f"794625-{N_FRAMES + 5}"].startswith(f"frame {N_FRAMES + 5} is beyond the scan's {N_FRAMES} frames")
    assert lines["794700-1"].startswith(str(scan_dir / "broken" / "794700.nxs")) and "not an HDF5 file" in lines["794700-1"]
    assert lines["794701-2"] == f"2 files named 794701.nxs under {scan_dir} (a/794701.nxs, b/794701.nxs)"


def test_check_command(scan_dir, tmp_path):
    path = pairing_csv(tmp_path / "pairing.csv")
    result = run_cli("labels", "check", str(path), "--scan-dir", str(scan_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        f"14 classifications of 13 images in {path}",
        "1 images with several classifications: the one with the most polygons is kept (ties: the lowest classification_id)",
        f"9 frames paired with scans under {scan_dir}",
        "4 images not paired:",
    ]
    assert len(lines) == 8 and f"  799999-3: no scan file 799999.nxs under {scan_dir}" in lines[4:]

    broken = write_csv(tmp_path / "broken.csv", [csv_row(1, "794673-1", []), ["2", "{", "[]", "5"]])
    for csv_path, expected in [(broken, f"pipeline labels check: {broken}: row 2, subject_data: not JSON"),
                               (tmp_path / "missing.csv", f"pipeline labels check: {tmp_path / 'missing.csv'}: cannot read the labels CSV")]:
        result = run_cli("labels", "check", str(csv_path), "--scan-dir", str(scan_dir))
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(expected), result.stderr


# -- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A scan store made by hand with zarr in the store's schema: simulator truth as both label arrays, frame 4 not done, frame 2 empty."""
    path = tmp_path_factory.mktemp("store") / "794673.zarr"
    n = 8
    scan = synth.RockingScan(n, seed=21)
    truth = np.stack([scan.truth(i) for i in range(n)])
    truth[2] = 0
    done = np.ones(n, dtype=np.uint8)
    done[4] = 0
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update({schema.Attr.SOURCE_FILE: str(path.parent / "794673.nxs"), schema.Attr.SOURCE_DATASET: "entry1/pil3_100k/data",
                        schema.Attr.STATUS: schema.STATUS_COMPLETE})
    for name, dtype in ((schema.TLM_LABELS, "uint16"), (schema.VOLUME_LABELS, "uint32")):
        array = group.create_array(name, shape=truth.shape, chunks=(1, *FRAME_SHAPE), dtype=dtype, fill_value=0,
                                   dimension_names=schema.FRAME_DIMS)
        array[:] = truth.astype(dtype)
    group.create_array(schema.FRAMES_DONE, shape=(n,), chunks=(schema.DONE_CHUNK,), dtype="uint8", fill_value=0)[:] = done
    return path, truth, done


def test_export_reads_back(store, tmp_path):
    path, truth, done = store
    out = tmp_path / "out" / "export.csv"
    assert export_store(path, out, source="volume") == int(done.sum())
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(L.COLUMNS)
    empty = rows[2]
    assert json.loads(empty["annotations"]) == [{"task": "T1", "task_label": L.COUNT_LABEL, "value": "0"},
                                                {"task": "T3", "task_label": L.POLYGON_LABEL, "value": []}]
    subject = json.loads(rows[1]["subject_data"])
    assert subject == {"2": {"Image Number": "794673-1", "source": str(path.resolve()), "png": "794673-1.png"}} and rows[1]["subject_ids"] == "2"
    shape = json.loads(rows[1]["annotations"])[1]["value"][0]
    assert set(shape) == {"tool", "frame", "closed", "points", "details", "tool_label"} and shape["closed"] is True
    assert set(shape["points"][0]) == {"x", "y"}

    classifications = read_classifications(out)
    assert [c.frame for c in classifications] == np.flatnonzero(done).tolist()
    assert len({c.classification_id for c in classifications}) == len(classifications)
    ious = []
    for classification in classifications:
        frame_truth = truth[classification.frame]
        ids = [int(i) for i in np.unique(frame_truth) if i]
        assert classification.peak_count == len(ids) == len(classification.polygons)
        labels = rasterise(classification.polygons)
        ious += [iou(frame_truth == instance, labels == number) for number, instance in enumerate(ids, start=1)]
    assert len(ious) >= 4 and min(ious) >= 0.95, f"minimum IoU {min(ious):.4f}"
    print(f"export: {len(ious)} instances, minimum IoU {min(ious):.4f}")


def test_export_command(store, tmp_path):
    path, _truth, done = store
    out = tmp_path / "tlm.csv"
    result = run_cli("labels", "export", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{int(done.sum())} rows written to {out}\n"
    assert len(read_classifications(out)) == int(done.sum())

    result = run_cli("labels", "export", str(tmp_path), "--out", str(out))
    assert result.returncode == 2 and result.stderr == f"pipeline labels export: {tmp_path}: not a Zarr store (no zarr.json there)\n"
    with pytest.raises(LabelsError, match="source 'ssl'"):
        export_store(path, out, source="ssl")
