"""Every ```python snippet of the "Reading the outputs" sections runs on a real finished store.

Two places hold such a section (under "## Reading the outputs"): README.md, with one short example
(xarray, dask and pandas together), and docs/reading-outputs.md, with one example for each way in
(zarr, xarray, DataTree, dask, the tables as numpy and as pandas). Each snippet's first line must be
`store = "..."`; the test puts a real store's path there, runs the snippet, and checks what it
produced. dask and pandas are in the project's test dependencies, so every snippet runs.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.store.schema import PEAK_COLUMNS
from pipeline.testing.pictures import N_FRAMES

pytestmark = pytest.mark.daemon

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Reading the outputs"
FIRST_LINE = re.compile(r'^store = "[^"]*"$')
README = REPO / "README.md"
GUIDE = REPO / "docs" / "reading-outputs.md"


def section_text(path: Path) -> str:
    """The text under HEADING in `path`, up to the next second-level heading."""
    lines = path.read_text().splitlines()
    assert HEADING in lines, f"no '{HEADING}' section in {path.relative_to(REPO)}"
    start = lines.index(HEADING) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def snippets(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", section_text(path), flags=re.S | re.M)


SNIPPETS = [(path, snippet) for path in (README, GUIDE) for snippet in snippets(path)]


def test_the_guide_has_snippets_for_each_way_in():
    guide = snippets(GUIDE)
    text = "\n".join(guide)
    assert len(guide) >= 5
    for needed in ("use_consolidated=False", "frames/done", "xr.open_zarr", "open_datatree", "dask.array", "peaks", "pandas", "h5py"):
        assert needed in text, needed
    for _, snippet in SNIPPETS:
        assert FIRST_LINE.match(snippet.splitlines()[0]), snippet.splitlines()[0]


def test_the_readme_has_one_short_example_and_names_the_installs():
    (example,) = snippets(README)
    assert len(example.splitlines()) <= 8, "the README's example stays short; the guide has the rest"
    for needed in ("xr.open_zarr", "consolidated=False", "use_consolidated=False", "done", "pd.DataFrame", "peaks"):
        assert needed in example, needed
    section = section_text(README)
    assert "pip install xarray dask pandas" in section
    assert "docs/reading-outputs.md" in section


def check_results(namespace: dict) -> list[str]:
    """Assert what a snippet's variables should hold; returns what was checked."""
    import xarray as xr

    checked = []
    for name, value in namespace.items():
        if isinstance(value, xr.Dataset) and "peak_id" in value:
            assert value["peak_id"].dims == ("frame", "y", "x")
            assert value.sizes["y"] == 195 and value.sizes["x"] == 487
            checked.append(name)
        elif hasattr(xr, "DataTree") and isinstance(value, xr.DataTree):
            assert value["volume"]["labels"].dims == ("frame", "y", "x")
            assert value["tlm"]["labels"].sizes["frame"] == N_FRAMES
            checked.append(name)
    if "final" in namespace:
        assert namespace["final"].sizes["frame"] == N_FRAMES  # a finished scan: every frame done
    if "peak_pixels" in namespace:
        assert np.asarray(namespace["peak_pixels"]).shape == (N_FRAMES,)
        checked.append("peak_pixels")
    peaks = namespace.get("peaks")
    if isinstance(peaks, dict):
        assert set(peaks) == set(PEAK_COLUMNS) and all(isinstance(v, np.ndarray) for v in peaks.values())
        checked.append("peaks")
    elif peaks is not None and hasattr(peaks, "columns"):  # a pandas DataFrame
        assert set(peaks.columns) | {peaks.index.name} == set(PEAK_COLUMNS)
        checked.append("peaks")
    if "raw" in namespace:
        assert namespace["raw"].shape == (195, 487)
        checked.append("raw")
    return checked


@pytest.mark.parametrize("which", ["pipeline", "truth"])
@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"{path.stem}-{i + 1}" for i, (path, _) in enumerate(SNIPPETS)])
def test_snippet_runs_on_a_finished_store(index, which, processed_scan, truth_store):
    """On the pipeline's own store (untrained models: few or no peaks) and on its ground-truth copy (2 peaks)."""
    store = processed_scan.store if which == "pipeline" else truth_store
    path, snippet = SNIPPETS[index]
    lines = snippet.splitlines()
    code = "\n".join([f"store = {str(store)!r}", *lines[1:]])
    namespace: dict = {}
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, f"snippet {index + 1} ({path.relative_to(REPO)})", "exec"), namespace)
    assert output.getvalue().strip(), "the snippet printed nothing"
    assert check_results(namespace), f"nothing recognisable to check after snippet {index + 1} of {path.relative_to(REPO)}"
    if which == "truth" and "n_peaks" in namespace:
        assert namespace["n_peaks"] == 2
    if which == "truth" and hasattr(namespace.get("peaks"), "columns"):
        assert len(namespace["peaks"]) == 2


def test_the_guide_s_raw_frame_read_works_while_the_detector_still_writes_the_file(processed_scan, tmp_path):
    """The guide's first example, marked safe while the scan runs, opened the raw file without swmr=True: h5py refused
    a file another process holds open for SWMR writing (`file is already open for write`). A copy of the store whose
    raw file a second process holds open as the detector does."""
    import shutil
    import subprocess
    import sys

    import zarr

    store = tmp_path / "live.zarr"
    shutil.copytree(processed_scan.store, store)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    raw_file = tmp_path / "live.nxs"
    shutil.copyfile(group.attrs["source_file"], raw_file)
    group.attrs["source_file"] = str(raw_file)
    detector = subprocess.Popen([sys.executable, "-c", "import h5py, sys\n"
                                 f"handle = h5py.File({str(raw_file)!r}, 'a', libver='latest')\n"
                                 "handle.swmr_mode = True\nprint('writing', flush=True)\nsys.stdin.read()\nhandle.close()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert detector.stdout is not None and detector.stdout.readline() == "writing\n"
        first = next(snippet for path, snippet in SNIPPETS if path == GUIDE and "h5py" in snippet)
        namespace: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile("\n".join([f"store = {str(store)!r}", *first.splitlines()[1:]]), "the guide's first example", "exec"), namespace)
    finally:
        detector.communicate("", timeout=30)
    assert detector.returncode == 0
    assert namespace["raw"].shape == (195, 487)
