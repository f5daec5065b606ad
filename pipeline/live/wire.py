"""Messages between the daemon and its workers: multipart ZeroMQ, a JSON header and raw array bytes.

Nothing here unpickles anything. Every message from a socket is untrusted: `decode_*` checks the
part count, the JSON, every header field's type and range, and that the byte count matches the
claimed dtype and shape, and raises `WireError` with a one-line reason otherwise.

A result's masks travel dense, or, when few of their pixels are set (most frames: peaks are
small, many frames have none), as the set pixels' flat indices and values (`sparse` in the header:
a count per mask, null for dense), so an empty frame's answer is a few hundred bytes, not 380 KB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from pipeline.common.zeros import shared_zeros
from pipeline.models.prediction import Detection, FramePrediction

PROTOCOL = 1
Part: TypeAlias = bytes | memoryview
"""A message part: bytes, or a view of the message's own memory (array parts sent and received without a copy)."""
ZERO_COPY_BYTES = 64 * 1024  # parts at least this long travel as views of their memory (pyzmq's own copy threshold)
MAX_HEADER_BYTES = 64 * 1024
MAX_SIDE = 8192  # no area detector has a side longer than this (an Eiger2 16M: 4148 x 4362)
MAX_DETECTIONS = 1000
MAX_PARTS = 5  # a result, the longest message kind: kind, header, three arrays
SPARSE_MAX_FRACTION = 0.1  # a result's mask with at most this fraction of its pixels set travels as those pixels alone

MAX_CREDIT = 4096  # no credit message may claim more (the dispatcher caps it further by workers.credit)
FRAME_DTYPES = {"int32", "uint32", "int16", "uint16", "float32"}

# Message kinds, the first part of every multipart message.
HELLO = b"hello"  # worker -> daemon: who it is and how many frames it can hold
CREDIT = b"credit"  # worker -> daemon: room for n more frames
RESULT = b"result"  # worker -> daemon: one frame's predictions
HEARTBEAT = b"heartbeat"  # worker -> daemon: still alive
BYE = b"bye"  # worker -> daemon: leaving cleanly
FRAME = b"frame"  # daemon -> worker: one frame to segment
STOP = b"stop"  # daemon -> worker: finish what you hold, then leave
REJOIN = b"rejoin"  # daemon -> worker: I do not know you (I restarted, or dropped you): say hello again
MAX_NUMBER = 1e12  # no box, score, id or time in a result comes near this


HANDSHAKE_MS = 5000  # a connection that has not completed the ZeroMQ handshake by then is closed: idle ones cannot pile up to EMFILE

class WireError(ValueError):
    """A message that breaks the protocol; the message says why in one line."""


@dataclass(frozen=True)
class FrameTask:
    """One frame sent to a worker. `task` is unique per dispatch, so a late or replayed result is recognisable."""

    task: int
    scan: str
    frame: int
    data: np.ndarray


@dataclass
class FrameResult:
    task: int
    scan: str
    frame: int
    worker: str
    prediction: FramePrediction
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = ""  # not on the wire: the dispatcher fills it in from the worker's hello


def max_part_bytes(max_frame_pixels: int) -> int:
    """The largest message part either side accepts (ZMQ_MAXMSGSIZE): the largest frame allowed (`follow.max_frame_pixels`)
    of 4-byte pixels and a header's worth. A larger part disconnects its sender before anything of it is kept."""
    return MAX_HEADER_BYTES + 4 * max_frame_pixels  # room for CurveZMQ's framing too


def carried(data: np.ndarray) -> np.ndarray:
    """A frame in a dtype the wire carries (`FRAME_DTYPES`): floats as float32, small integers widened,
    64-bit counts clipped to int32 (counts beyond it saturate the detector long before)."""
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False)
    if data.dtype.name in FRAME_DTYPES:
        return data
    if data.dtype.itemsize == 1:
        return data.astype(np.int16 if data.dtype.kind == "i" else np.uint16)
    info = np.iinfo(np.int32)
    return np.clip(data, info.min, info.max).astype(np.int32)


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_header(raw: Part) -> dict[str, Any]:
    """The JSON object in `raw`, or WireError."""
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(raw))
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd numbers, absurd nesting
        raise WireError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WireError(f"header is a JSON {type(header).__name__}, not an object")
    return header


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise WireError(f"header field {name!r} missing or not {getattr(kind, '__name__', kind)}: {value!r}"[:200])
    return value


def frame_shape_problem(height: int, width: int) -> str | None:
    """Why a worker would refuse frames of this shape, or None. The follower asks before it reads a frame, so a frame the
    wire cannot carry fails its scan in one line, not in a worker that can only drop it (it stayed in flight for ever,
    and `workers.credit` of them stalled every scan)."""
    if 0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE:
        return None
    return f"a side longer than {MAX_SIDE}, the longest a worker takes" if max(height, width) > MAX_SIDE else "an empty side"


def _shape(header: dict[str, Any]) -> tuple[int, int]:
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        or frame_shape_problem(shape[0], shape[1]) is not None
    ):
        raise WireError(f"header field 'shape' must be two sides in 1..{MAX_SIDE}: {shape!r}"[:200])
    return shape[0], shape[1]


def _array(payload: Part, dtype: str, shape: tuple[int, int], what: str) -> np.ndarray:
    expected = int(np.dtype(dtype).itemsize) * shape[0] * shape[1]
    if len(payload) != expected:
        raise WireError(f"{what}: {len(payload)} bytes, but {dtype} {shape} needs {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def encode_frame(task: FrameTask) -> list[Part]:
    """The frame's pixels go as a view of the array, not a copy: send with `copy=False` (the array must not change
    until ZeroMQ has sent it; frames are never written to once read)."""
    data = np.ascontiguousarray(task.data)
    header = {"task": task.task, "scan": task.scan, "frame": task.frame, "dtype": str(data.dtype), "shape": list(data.shape)}
    return [FRAME, _json(header), memoryview(data).cast("B")]  # type: ignore[arg-type]  # numpy arrays are buffers


def received_parts(frames: list[Any]) -> list[Part]:
    """`recv_multipart(copy=False)`'s frames as parts: short ones as bytes, long ones (arrays) as views of their memory."""
    return [frame.buffer if len(frame) >= ZERO_COPY_BYTES else frame.bytes for frame in frames]


def decode_frame(parts: Sequence[Part]) -> FrameTask:
    if len(parts) != 3 or parts[0] != FRAME:
        raise WireError(f"frame message needs 3 parts starting {FRAME!r}, got {len(parts)}")
    header = parse_header(parts[1])
    dtype = _field(header, "dtype", str)
    if dtype not in FRAME_DTYPES:
        raise WireError(f"frame dtype {dtype!r} not one of {sorted(FRAME_DTYPES)}"[:200])
    shape = _shape(header)
    return FrameTask(
        task=_field(header, "task", int),
        scan=_field(header, "scan", str),
        frame=_field(header, "frame", int),
        data=_array(parts[2], dtype, shape, "frame"),
    )


def encode_result(result: FrameResult) -> list[Part]:
    prediction = result.prediction
    header = {
        "task": result.task,
        "scan": result.scan,
        "frame": result.frame,
        "worker": result.worker,
        "shape": list(prediction.tlm_labels.shape),
        "detections": [[*d.box, d.score, d.instance_id] for d in prediction.detections],
        "timings": prediction.timings,
        "detection_cap": prediction.detection_cap,
        "detections_capped": prediction.detections_capped,
        **({"extra": result.extra} if result.extra else {}),
    }
    masks = [_mask_part(prediction.tlm_labels, np.uint16), _mask_part(prediction.ssl_clusters, np.uint8),
             _mask_part(prediction.ssl_mask, np.uint8)]
    header["sparse"] = [count for _, count in masks]
    # dense masks as views, not copies: send with `copy=False` (a prediction is never changed once made)
    return [RESULT, _json(header), *(part for part, _ in masks)]


def _mask_part(array: np.ndarray, dtype: type[np.generic]) -> tuple[Part, int | None]:
    """A mask as it travels: (its bytes, None), or, when at most SPARSE_MAX_FRACTION of its pixels are set, its set
    pixels as (flat indices as uint32, then their values; their count). Why: peaks cover a few hundred pixels of a
    95,000-pixel module, and a frame's three masks are 380 KB: workers on other nodes (SLURM, Kubernetes) at 1,000
    frames/s would send 380 MB/s of mostly zeros back over the network. (On one host it saves little CPU: moving the
    dense masks through an ipc socket costs ~0.03 ms a frame.)"""
    array = np.ascontiguousarray(array, dtype=dtype)
    if array.max(initial=0) == 0:  # the masks are unsigned: an empty one told ~2x faster than by counting
        return b"", 0
    flat = array.reshape(-1)
    set_pixels = flat != 0  # numpy finds the set pixels of a bool array ~5x faster than of a uint8 or uint16 one
    if np.count_nonzero(set_pixels) > array.size * SPARSE_MAX_FRACTION:
        return memoryview(array).cast("B"), None  # type: ignore[arg-type]  # numpy arrays are buffers
    indices = np.flatnonzero(set_pixels)
    return indices.astype(np.uint32).tobytes() + flat[indices].tobytes(), int(indices.size)


def _mask(payload: Part, dtype: str, shape: tuple[int, int], count: Any, what: str) -> np.ndarray:
    """A mask from its part: dense (`count` None) or its set pixels (see `_mask_part`), checked as strictly as a dense one:
    the byte count, every index inside the frame, indices strictly increasing (so none is set twice)."""
    if count is None:
        return _array(payload, dtype, shape, what)
    pixels = shape[0] * shape[1]
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= pixels:
        raise WireError(f"{what}: sparse count must be 0..{pixels}: {count!r}"[:200])
    itemsize = int(np.dtype(dtype).itemsize)
    if len(payload) != count * (4 + itemsize):
        raise WireError(f"{what}: {len(payload)} bytes, but {count} set pixels of {dtype} need {count * (4 + itemsize)}")
    indices = np.frombuffer(payload, dtype=np.uint32, count=count)
    if count and (int(indices[-1]) >= pixels or bool(np.any(indices[1:] <= indices[:-1]))):
        raise WireError(f"{what}: sparse indices must increase strictly and stay below {pixels}")
    if count == 0:
        return shared_zeros(shape, dtype)  # an empty mask: most are (pipeline.common.zeros)
    mask = np.zeros(pixels, dtype=dtype)
    mask[indices] = np.frombuffer(payload, dtype=dtype, count=count, offset=4 * count)
    return mask.reshape(shape)


def _detections(raw: Any) -> list[Detection]:
    if not isinstance(raw, list) or len(raw) > MAX_DETECTIONS:
        raise WireError(f"'detections' must be a list of at most {MAX_DETECTIONS}")
    detections = []
    for row in raw:
        if (
            not isinstance(row, list)
            or len(row) != 6
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < MAX_NUMBER for v in row)
            or not all(np.isfinite(row))
            or not (isinstance(row[5], int) and 0 < row[5] <= 65535)
        ):
            raise WireError(f"detection must be [x0, y0, x1, y1, score, id]: {row!r}"[:200])
        detections.append(Detection(box=(float(row[0]), float(row[1]), float(row[2]), float(row[3])), score=float(row[4]), instance_id=row[5]))
    return detections


def decode_result(parts: Sequence[Part]) -> FrameResult:
    if len(parts) != 5 or parts[0] != RESULT:
        raise WireError(f"result message needs 5 parts starting {RESULT!r}, got {len(parts)}")
    header = parse_header(parts[1])
    shape = _shape(header)
    timings = header.get("timings", {})
    if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) and abs(v) < MAX_NUMBER for v in timings.values()):
        raise WireError("'timings' must map stage names to seconds")
    cap = header.get("detection_cap", 0)  # absent from workers older than the caps: no cap known
    capped = header.get("detections_capped", False)
    if not (isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap <= MAX_DETECTIONS) or not isinstance(capped, bool):
        raise WireError(f"'detection_cap' must be 0..{MAX_DETECTIONS} and 'detections_capped' true or false: {cap!r}, {capped!r}"[:200])
    sparse = header.get("sparse", [None, None, None])  # absent from workers older than sparse masks: all dense
    if not isinstance(sparse, list) or len(sparse) != 3:
        raise WireError(f"'sparse' must list 3 counts (or nulls): {sparse!r}"[:200])
    prediction = FramePrediction(
        tlm_labels=_mask(parts[2], "uint16", shape, sparse[0], "tlm labels"),
        detections=_detections(header.get("detections")),
        ssl_clusters=_mask(parts[3], "uint8", shape, sparse[1], "ssl clusters"),
        ssl_mask=_mask(parts[4], "uint8", shape, sparse[2], "ssl mask"),
        timings={str(k): float(v) for k, v in timings.items()},
        detections_capped=capped,
        detection_cap=cap,
    )
    return FrameResult(
        task=_field(header, "task", int),
        scan=_field(header, "scan", str),
        frame=_field(header, "frame", int),
        worker=str(header.get("worker", ""))[:100],
        prediction=prediction,
    )


def encode_control(kind: bytes, body: dict[str, Any] | None = None) -> list[bytes]:
    """A small message of one kind and a JSON body (hello, credit, heartbeat, bye, stop)."""
    return [kind, _json(body or {})]


def decode_control(parts: Sequence[Part]) -> tuple[bytes, dict[str, Any]]:
    if len(parts) != 2:
        raise WireError(f"control message needs 2 parts, got {len(parts)}")
    return bytes(parts[0]), parse_header(parts[1])  # parse_header takes a view too


def credit_of(body: dict[str, Any], limit: int) -> int:
    """The credit a hello/credit message grants, bounded so a hostile peer cannot claim the queue."""
    n = _field(body, "n", int)
    if not 0 <= n <= limit:
        raise WireError(f"credit {n} outside 0..{limit}")
    return n
