"""A daemon killed with kill -9 leaves its private folder in the temporary directory (its workers'
socket, their config, the CurveZMQ keys it allowed); the next daemon to start removes it. A folder
a live daemon holds is never removed, not even by a second daemon starting beside it.

Before, every daemon killed left a `pipeline-workers-*` folder, a `pipeline-worker-*.json` and a
`pipeline-allowed-keys-*` folder behind for good: one set per crash of a daemon that systemd restarts.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.live.security import generate_keys
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_workers

pytestmark = pytest.mark.daemon


def _ours(temporary: Path) -> list[Path]:
    """What the pipeline left in the temporary directory (torch leaves a compile cache there too: not ours)."""
    return sorted(temporary.glob("pipeline*"))


def _daemon(tmp_path: Path, name: str, secret: Path):
    scans = tmp_path / f"scans-{name}"
    scans.mkdir()
    config = write_config(tmp_path / f"{name}.yaml", models=MODELS_OFF, workers={"curve_secret_key": str(secret)})
    process = start_daemon(config, scans, tmp_path / f"{name}.log")
    wait_for_workers(config, 1)
    return process


def test_a_killed_daemons_folder_is_removed_by_the_next_start_and_a_live_ones_never(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # the daemons' temporary directory: this test's alone
    _, secret = generate_keys(tmp_path / "keys", "daemon")

    killed = _daemon(tmp_path, "killed", secret)
    (left,) = _ours(temporary)  # one folder holds all of a daemon's private files
    assert stat.S_IMODE(left.stat().st_mode) == 0o700
    assert {path.name for path in left.iterdir()} >= {"workers", "worker-config.json", "allowed-keys"}
    assert stat.S_IMODE((left / "worker-config.json").stat().st_mode) == 0o600
    killed.kill()  # SIGKILL; its worker ends when it sees its parent gone
    killed.wait(timeout=30)
    assert _ours(temporary) == [left]  # a kill -9 cannot clean up

    first = _daemon(tmp_path, "first", secret)
    try:
        (held,) = _ours(temporary)  # the killed one's went at this start
        assert held != left and not left.exists()
        log = (tmp_path / "first.log").read_text()
        assert f"removed 1 private folder(s) left in {temporary} by daemons that were killed: {left.name}" in log, log[-2000:]

        second = _daemon(tmp_path, "second", secret)  # starts beside a live daemon: must leave its folder alone
        try:
            assert held.exists() and len(_ours(temporary)) == 2
            assert "private folder(s) left" not in (tmp_path / "second.log").read_text()
        finally:
            stop_daemon(second)
        assert first.poll() is None and held.exists()
        wait_for_workers(tmp_path / "first.yaml", 1)  # still serving its workers
    finally:
        stop_daemon(first)
    assert first.returncode == 0
    assert _ours(temporary) == []  # stopped normally, each removed its own
