"""What a soak drops into the watched directory: good scans (a simulator writer each) and bad files, with their stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.store import store_path_for

if TYPE_CHECKING:
    from pipeline.simulator.writers import ScanPlan, ScanWriter


@dataclass
class GoodScan:
    plan: ScanPlan
    writer: ScanWriter
    started: float
    written_at: float | None = None
    writer_error: str | None = None
    output_root: Path | None = None  # the daemon's output.root (a small file system of its own for the disk_full fault)

    @property
    def store(self) -> Path:
        return store_path_for(self.plan.nxs_path, self.output_root, [self.plan.nxs_path.parent])


@dataclass
class BadFile:
    path: Path
    kind: str
    detail: str
    made_at: float
    output_root: Path | None = None

    @property
    def store(self) -> Path:
        return store_path_for(self.path, self.output_root, [self.path.parent])

    @property
    def skipped(self) -> bool:
        """A file with no detector frames is no scan: the daemon skips it with one line and makes no store (its other
        bad files end in a `failed` store)."""
        return self.kind == "no_detector"
