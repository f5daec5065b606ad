"""Logging a person can read: one line per event, to the console and optionally a rotating file."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 1024 * 1024, backupCount=5))
    logging.basicConfig(level=getattr(logging, level), format=FORMAT, datefmt="%H:%M:%S", handlers=handlers, force=True)
    for noisy in ("h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)  # its shutdown races log errors that mean nothing
