"""Facts about the detector the pipeline serves (Pilatus3 100K on I16), defined once.

The frame shape is only I16's: the daemon takes each scan's frame shape from its file (any
detector), unless `follow.frame_shape` in the config asks for one shape.
"""

from __future__ import annotations

FRAME_SHAPE: tuple[int, int] = (195, 487)
"""(rows, columns) of a Pilatus3 100K frame."""
DEAD_PIXEL = -2
"""What the Pilatus reports for a dead pixel; the follower turns non-finite pixels into this too."""
SATURATION = 1_000_000
"""Counts at which a Pilatus pixel saturates."""
