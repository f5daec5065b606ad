"""The store's layout, defined once: array paths, their dtypes and dimensions, attribute names, statuses.

Every other module names a path or attribute of a scan's store through this module, so the
contract in the design notes (and docs/reading-outputs.md's table) has one home in the code. Changing a name
here changes the contract: do it on purpose and say so in the README.
"""

from __future__ import annotations

from typing import Final

ZARR_FORMAT: Final = 3
ROOT_METADATA: Final = "zarr.json"  # the root group's metadata document, attributes included
SOFTWARE: Final = "beamline-peak-pipeline"

FRAME_DIMS: Final = ("frame", "y", "x")

# -- arrays indexed by frame (one frame per chunk) -------------------------------------------
TLM_LABELS: Final = "tlm/labels"
SSL_CLUSTERS: Final = "ssl/clusters"
SSL_MASK: Final = "ssl/mask"
VOLUME_LABELS: Final = "volume/labels"
FRAME_ARRAYS: Final = {TLM_LABELS: "uint16", SSL_CLUSTERS: "uint8", SSL_MASK: "uint8", VOLUME_LABELS: "uint32"}
"""path -> dtype of the (frame, y, x) arrays."""
# frames per shard (Zarr v3 sharding) of the frame arrays and tlm/boxes: one file holds this many one-frame chunks,
# because creating a file costs ~0.4-2 ms of kernel time here, per array per frame (docs/performance.md). The chunk, the unit a
# reader decodes, is still one frame.
FRAME_SHARD: Final = 64

TLM_BOXES: Final = "tlm/boxes"
MAX_DETECTIONS_PER_FRAME: Final = 256
BOX_FIELDS: Final = ("x0", "y0", "x1", "y1", "score", "instance_id")  # tlm/boxes: per frame, NaN-padded rows
BOX_DIMS: Final = ("frame", "detection", "field")
BOX_FIELDS_ATTR: Final = "fields"

FRAMES_DONE: Final = "frames/done"  # uint8: 1 once every other output of the frame is written
FRAMES_AXIS: Final = "frames/axis"  # float64: the scan axis value of each frame
AXIS_NAME_ATTR: Final = "name"  # frames/axis attribute: the scan axis's name
DONE_CHUNK: Final = 4096  # frames per chunk of the 1-D per-frame arrays
FRAMES_WORKER: Final = "frames/worker"  # uint16: which worker made the frame's outputs, 1-based into its `names`; 0 none
WORKER_NAMES_ATTR: Final = "names"

PER_FRAME_ARRAYS: Final = (*FRAME_ARRAYS, TLM_BOXES, FRAMES_DONE, FRAMES_AXIS, FRAMES_WORKER)
"""Every array whose first dimension is the frame: grown and trimmed together."""

# -- tables: groups of equal-length 1-D columns, rewritten whole -------------------------------
PEAKS: Final = "peaks"
TLM_DETECTIONS: Final = "tlm/detections"
TABLES: Final = (PEAKS, TLM_DETECTIONS)
ROWS_ATTR: Final = "rows"  # table group attribute: how many rows of its columns are valid
# table group attribute, a seqlock: odd while the writer rewrites the columns, even once they are one whole generation.
# A reader reads it, the columns, then it again; the read is whole when both were the same even number.
GENERATION_ATTR: Final = "generation"
ROW_DIMS: Final = ("row",)
PEAK_COLUMNS: Final = (
    "id", "first_frame", "last_frame", "centroid_frame", "centroid_y", "centroid_x",
    "voxels", "intensity_sum", "intensity_max", "axis_value",
)
DETECTION_COLUMNS: Final = {"frame": "int64", "x0": "float32", "y0": "float32", "x1": "float32", "y1": "float32",
                            "score": "float32", "instance_id": "uint16"}
TABLE_COLUMNS: Final = {PEAKS: PEAK_COLUMNS, TLM_DETECTIONS: tuple(DETECTION_COLUMNS)}
"""Each table's columns, in order: readers open them by name (a listing of the folder mid-write meets zarr's temp files)."""

COMPARED_ARRAYS: Final = (TLM_LABELS, SSL_CLUSTERS, SSL_MASK, VOLUME_LABELS, FRAMES_DONE, FRAMES_AXIS)
"""What makes two stores of one scan the same: these arrays and both tables."""

# -- statuses ---------------------------------------------------------------------------------
STATUS_RUNNING: Final = "running"
STATUS_COMPLETE: Final = "complete"
STATUS_INCOMPLETE: Final = "incomplete"
STATUS_FAILED: Final = "failed"
FINAL_STATUSES: Final = (STATUS_COMPLETE, STATUS_INCOMPLETE, STATUS_FAILED)


class Attr:
    """Names of the root group's attributes (the README lists what each holds)."""

    SOFTWARE: Final = "software"
    SOFTWARE_VERSION: Final = "software_version"
    CONFIG: Final = "config"
    MODELS: Final = "models"
    DEVICE: Final = "device"
    SOURCE_NEXUS: Final = "source_nexus"
    SOURCE_FILE: Final = "source_file"
    SOURCE_DATASET: Final = "source_dataset"
    SOURCE_START_TIME: Final = "source_start_time"
    SOURCE_STAT: Final = "source_stat"
    LAYOUT: Final = "layout"
    SCAN_COMMAND: Final = "scan_command"
    FRAMES_EXPECTED: Final = "frames_expected"
    AXIS_NAME: Final = "axis_name"
    AXIS_PATH: Final = "axis_path"  # the scan file's dataset whose values frames/axis holds
    AXIS_SOURCE: Final = "axis_source"  # how it was chosen (NeXus default plot, scan command)
    DETECTOR_PATH: Final = "detector_path"  # where in the scan file the frames were found
    FRAMES_EXPECTED_SOURCE: Final = "frames_expected_source"  # scan_shape, scan_dimensions or the scan command
    STATUS: Final = "status"
    END_REASON: Final = "end_reason"
    START_TIME: Final = "start_time"
    END_TIME: Final = "end_time"
    RESUMED_AT: Final = "resumed_at"
    DISK_FULL: Final = "disk_full"  # list of {at, error, resumed_at}: each time writing stopped for want of space
    FRAMES_TOTAL: Final = "frames_total"
    FRAMES_DONE: Final = "frames_done"
    FAILED_FRAMES: Final = "failed_frames"
    BAD_FRAMES: Final = "bad_frames"
    CAPPED_FRAMES: Final = "capped_frames"  # frames whose TLM returned as many detections as it may: more peaks may be cut
    DETECTION_CAP: Final = "detection_cap"  # the most detections the TLM returned for one of those frames
