"""Running as a service: the log goes to a rotating file as well as the console, SIGHUP says plainly
that the config is not reloaded, and SIGTERM stops the daemon cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from pipeline.testing.configs import write_config
from pipeline.testing.daemons import wait_for_workers

pytestmark = pytest.mark.daemon


def test_log_file_sighup_and_sigterm(tmp_path, untrained_weights):
    log_file = tmp_path / "logs" / "pipeline.log"
    config = write_config(tmp_path / "c.yaml", untrained_weights, daemon={"log_file": str(log_file), "log_level": "INFO"})
    watched = tmp_path / "scans"
    watched.mkdir()
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watched)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_workers(config, 1)
        daemon.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.poll() is None  # SIGHUP does not stop it
    finally:
        daemon.send_signal(signal.SIGTERM)
        console, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0
    text = log_file.read_text()
    assert "config reload is not supported; restart the daemon" in text
    assert "watching " + str(watched) in text and "SIGTERM: draining" in text
    assert "config reload is not supported" in console  # the console gets the same lines
    assert "Traceback" not in text
