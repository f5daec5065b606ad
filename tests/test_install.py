"""A non-editable install finds its shipped weights and the web view's pages: package data, not files of the source tree.

Builds the wheel from this checkout, unpacks it into a fresh directory (its own copy of the
package, nothing of the source tree on its path) and asks that copy where its default weights
are and what their model cards say, in a fresh interpreter run from an unrelated directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, pipeline
from pipeline.models.card import default_weights_path, read_card
paths = {name: default_weights_path(name) for name in ("tlm", "sslm")}
from pipeline.web.app import STATIC
static = sorted(str(p.relative_to(STATIC)) for p in STATIC.rglob("*") if p.is_file())
print(json.dumps({"package": pipeline.__file__, "static": [str(STATIC), static],
                  **{name: [str(path), path.is_file(), read_card(path).architecture] for name, path in paths.items()}}))
"""
WEB_FILES = ["common.js", "favicon.svg", "index.html", "scan.html", "scan.js", "scans.js", "style.css", "vendor/uPlot.LICENSE",
             "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"]  # the web view's pages, scripts and styles: nothing from a CDN


def test_a_wheel_install_has_its_default_weights(tmp_path: Path) -> None:
    assert (REPO / "weights").is_dir() and not (REPO / "weights").is_symlink()  # at the repository's top, as the design says
    assert (REPO / "pipeline" / "weights").resolve() == (REPO / "weights").resolve()  # the package's way to it
    source = tmp_path / "source"  # a copy of what the wheel is built from: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("beamline_peak_pipeline-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "pipeline/weights/tlm.safetensors" in names and "pipeline/weights/sslm.safetensors" in names
        assert "pipeline/simulator/data/peak_outlines.npz" in names
        assert all(f"pipeline/web/static/{name}" in names for name in WEB_FILES), sorted(n for n in names if "/web/" in n)
        archive.extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(installed)!r})\n{PROBE}"],
                           capture_output=True, text=True, timeout=120, cwd=elsewhere)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout)
    assert Path(found["package"]).is_relative_to(installed)
    static, files = found["static"]
    assert Path(static).is_relative_to(installed) and files == WEB_FILES
    for name in ("tlm", "sslm"):
        path, exists, architecture = found[name]
        assert Path(path).is_relative_to(installed) and exists and architecture == name
