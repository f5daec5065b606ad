"""`pipeline demo`, the README's first command, on a tiny run: it empties only a folder a demo wrote.

`--out` was removed whatever it was (`--out .` would have cost a user the folder they stood in), and bad numbers were
tracebacks. Real processes, real folders.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.tools.demo import DEMO_MARKER


def demo(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "demo", *argv], capture_output=True, text=True, timeout=timeout)


def test_a_folder_no_demo_wrote_is_refused_and_kept(tmp_path: Path) -> None:
    notes = tmp_path / "visit" / "my-notes.txt"
    notes.parent.mkdir()
    notes.write_text("important")
    result = demo("--out", str(notes.parent), "--frames", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (f"pipeline demo: --out {notes.parent}: holds files that no demo wrote (no {DEMO_MARKER} in it); "
                             "the demo empties its folder first, so give a new or empty one\n")
    assert notes.read_text() == "important" and sorted(p.name for p in notes.parent.iterdir()) == ["my-notes.txt"]

    (notes.parent / "scans").mkdir()  # as demos before the mark left their folder, but with someone's notes beside it
    (notes.parent / "scans" / "demo-gda9.nxs").write_text("")
    result = demo("--out", str(notes.parent), "--frames", "2")
    assert result.returncode == 2 and notes.read_text() == "important", result.stderr

    result = demo("--out", str(notes), "--frames", "2")
    assert (result.returncode, result.stderr) == (2, f"pipeline demo: --out {notes}: a file, not a folder\n")
    assert notes.read_text() == "important"


def test_bad_numbers_are_one_line() -> None:
    for option, value, said in (("--frames", "0", "must be >= 1, got 0"), ("--workers", "0", "must be >= 1, got 0"),
                                ("--rate", "0", "must be a finite number > 0, got 0")):
        result = demo(option, value)
        assert (result.returncode, result.stderr) == (2, f"pipeline demo: argument {option}: {said}\n")


def test_a_tiny_demo_runs_again_in_the_folder_an_earlier_demo_wrote(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"  # as a demo before the mark (.pipeline-demo) left it: scans/demo-* only
    (out / "scans").mkdir(parents=True)
    (out / "scans" / "demo-gda9.zarr").mkdir()  # an earlier run's store: the new run must not take it for its own
    result = demo("--out", str(out), "--frames", "3", "--rate", "20", "--workers", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("demo-")]
    assert [(row[0], row[2], row[3]) for row in rows] == [("demo-gda9", "complete", "3/3"), ("demo-gda8", "complete", "3/3"),
                                                          ("demo-nexus", "complete", "3/3")], result.stdout
    assert (out / DEMO_MARKER).is_file()
    assert sorted(p.name for p in (out / "scans").glob("*.zarr")) == ["demo-gda8.zarr", "demo-gda9.zarr", "demo-nexus.zarr"]
