"""Ctrl-C and SIGTERM for the commands that run a daemon (`run`, `process`): stop honestly, never leave `running`.

First signal: stop taking scans, let frames in flight reach their stores, end every open scan `incomplete`
with `end_reason: stopped`. Second: the same without waiting for frames in flight (they are left not
done; a restart does them). Third, or the second not done within HURRY_S: exit at once (stores stay
consistent: a frame is done only once its outputs are written, so the worst is a store still saying
`running`, which the next start resumes).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

HURRY_S = 15.0  # after a second signal, the most a stop may still take before the process exits at once
WAKE_S = 0.5  # how often a main thread waiting for a signal wakes to run the handler of one another thread took


class StopSignals:
    """What the signals asked for so far; install() routes SIGINT and SIGTERM (and SIGHUP's warning) here."""

    def __init__(self) -> None:
        self.requested = threading.Event()  # first signal: drain and stop
        self.hurry = threading.Event()  # second signal: stop without waiting for frames in flight
        self.signal_name: str | None = None  # the first signal's name, e.g. "SIGINT"
        self.exit_code = 0  # 128 + the first signal's number (130 for SIGINT, 143 for SIGTERM) once one came

    def install(self) -> StopSignals:
        """Also: SIGUSR1 prints every thread's stack to standard error (the log under systemd), for a daemon that
        seems stuck; written by the C handler, so it works however stuck the Python threads are."""
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: log.warning("SIGHUP: config reload is not supported; restart the daemon to apply a new config"))
        return self

    def wait(self) -> None:
        """Block until the first signal. Never untimed: the kernel may hand the signal to another thread, and CPython
        runs the Python handler only once the main thread runs again; an untimed `Event.wait()` never returned (CI saw
        a daemon ignore its SIGTERM; tests/test_signal_to_any_thread.py sends one so)."""
        while not self.requested.wait(WAKE_S):
            pass

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            self.signal_name, self.exit_code = name, 128 + signum
            log.info("%s: draining frames in flight, then stopping (send it again to stop without waiting for them)", name)
            self.requested.set()
        elif not self.hurry.is_set():
            log.warning("second %s: stopping without waiting for frames in flight (they stay not done; a restart does them)", name)
            self.hurry.set()
            threading.Thread(target=self._exit_if_stuck, name="stop-deadline", daemon=True).start()
        else:
            log.warning("third %s: exiting now", name)
            os._exit(self.exit_code or 130)

    def _exit_if_stuck(self) -> None:
        time.sleep(HURRY_S)
        log.error("the stop took longer than %.0f s after the second signal; exiting now", HURRY_S)
        os._exit(self.exit_code or 130)
