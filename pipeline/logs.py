"""Logging a person can read: one line per event, to the console and optionally a rotating file."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from pipeline.common.file_names import shown

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


# torch logs its FakeTensor cache statistics at INFO from an atexit hook (torch._subclasses.fake_tensor.dump_cache_stats),
# through its own handlers as well as ours: when torch's loggers are at INFO, a worker's log ends with lines that mean
# nothing to a user. A filter on that logger itself drops them at the source, whatever handlers torch sets up on import
# (torch resets its loggers' levels and handlers then, not their filters)
QUIET_BELOW_WARNING = ("torch._subclasses.fake_tensor",)


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, with control characters escaped (pipeline.common.file_names.shown): names in
    it come from files anyone can write, and a newline there forged log lines, a terminal escape cleared the screen.
    A traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = shown(record.message)
        return super().formatMessage(record)


def _warnings_and_worse(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Our format on the console (and `log_file`, rotated), third parties' chatter below WARNING left out."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 1024 * 1024, backupCount=5))
    for name in QUIET_BELOW_WARNING:
        logger = logging.getLogger(name)
        if _warnings_and_worse not in logger.filters:
            logger.addFilter(_warnings_and_worse)
    formatter = OneLineFormatter(FORMAT, datefmt="%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level), handlers=handlers, force=True)
    for noisy in ("h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)  # its shutdown races log errors that mean nothing
