"""A store under the web view's roots whose files are not what they claim: refused quickly, in one line, memory flat.

Anyone who can write under a root can plant a store, and a store's chunk files were read with
zarr's LocalStore, which follows symbolic links and reads a file to its end: a chunk linked to
`/dev/zero` grew the web process to 14 GB, a chunk linked to another visit's store served that
store's values, and a FIFO blocked its reader for ever. Here a real `pipeline web` process (its own
memory, capped so that a regression cannot take the machine's) serves a root with a good store and
copies of it in which one file of each kind the pages read (frame flags and scan axis, frame masks,
the 3D labels behind the projection and the curves, a table column, an array's metadata, the root
metadata, a whole chunk folder) is a link to `/dev/zero`, a link to another store's file, a FIFO,
or a file larger than any encoding of its chunk. Each request that reads it must answer within
seconds with a one-line error naming the file; nothing of the other store may be served; the good
store must keep answering with its own values; and the process's peak memory must stay near where
it started.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import StoreReader, schema
from pipeline.testing.truth_stores import TruthStoreWriter
from pipeline.testing.web import WebProcess, get, web_process

MEMORY_LIMIT_MIB = 4096  # the web process's address space: a /dev/zero read stops at MemoryError, not at the machine's RAM
RSS_GROWTH_MIB = 250  # what the bad stores may add to the process's peak memory (a good scan's view is ~10 MiB)
ANSWER_S = 10.0  # every request answers within this, whatever the store holds

# case -> (the file made bad, how, the API that reads it, words the one-line error must hold)
CASES: dict[str, tuple[str, str, str, str]] = {
    "zero-done": ("frames/done/c/0", "zero", "/api/scans/{id}", "symbolic link"),
    "zero-axis": ("frames/axis/c/0", "zero", "/api/scans/{id}", "symbolic link"),
    "zero-volume": ("volume/labels/c/0/0/0", "zero", "/api/projection/{id}", "symbolic link"),
    "zero-tlm": ("tlm/labels/c/0/0/0", "zero", "/api/frame/{id}?frame=0", "symbolic link"),
    "zero-peaks": ("peaks/id/c/0", "zero", "/api/scans/{id}", "symbolic link"),
    "zero-metadata": ("volume/labels/zarr.json", "zero", "/api/scans/{id}", "symbolic link"),
    "swap-sums": ("peaks/intensity_sum/c/0", "swap", "/api/scans/{id}", "symbolic link"),
    "swap-tlm": ("tlm/labels/c/0/0/0", "swap", "/api/frame/{id}?frame=0", "symbolic link"),
    "swap-volume": ("volume/labels/c/0/0/0", "swap", "/api/projection/{id}", "symbolic link"),
    "swap-folder": ("frames/done/c", "swap", "/api/scans/{id}", "symbolic link"),
    "fifo-done": ("frames/done/c/0", "fifo", "/api/scans/{id}", "not a regular file"),
    "fifo-ssl": ("ssl/mask/c/0/0/0", "fifo", "/api/frame/{id}?frame=0", "not a regular file"),
    "big-done": ("frames/done/c/0", "big", "/api/scans/{id}", "larger than"),
    "big-volume": ("volume/labels/c/0/0/0", "big", "/api/projection/{id}", "larger than"),
    "big-peaks": ("peaks/id/c/0", "big", "/api/scans/{id}", "larger than"),
}
BIG_BYTES = 1 << 30  # sparse: costs no disk, but a reader that reads it whole holds 1 GiB


class Site:
    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        visit = self.root / "visit"
        visit.mkdir(parents=True)
        good = TruthStoreWriter(visit, "good", 6, seed=3, n_peaks=2)
        good.write(6)
        good.finish()
        self.good = good.store_path
        other = TruthStoreWriter(base / "other-visit", "secret", 6, seed=11, n_peaks=3)  # another visit's store
        other.write(6)
        other.finish()
        self.secret = other.store_path
        for case, (relative, how, _, _) in CASES.items():
            store = visit / f"{case}.zarr"
            shutil.copytree(self.good, store)
            target = store / relative
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
            if how == "zero":
                os.symlink("/dev/zero", target)
            elif how == "swap":
                os.symlink(self.secret / relative, target)
            elif how == "fifo":
                os.mkfifo(target)
            else:
                with target.open("wb") as handle:
                    handle.truncate(BIG_BYTES)
        # the root metadata of a store as a FIFO: the monitor that reads it must not hang
        fifo_root = visit / "fifo-root.zarr"
        shutil.copytree(self.good, fifo_root)
        (fifo_root / "zarr.json").unlink()
        os.mkfifo(fifo_root / "zarr.json")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("web-hostile"))


def timed_get(web: WebProcess, path: str) -> tuple[float, int, bytes]:
    started = time.monotonic()
    answer = get(web.url(path), timeout=ANSWER_S + 5)
    return time.monotonic() - started, answer.status, answer.body


def test_bad_chunk_files_are_refused_in_one_line_with_memory_flat(site: Site, tmp_path: Path) -> None:
    with web_process([site.root], tmp_path / "web.log", memory_limit_mib=MEMORY_LIMIT_MIB) as web:
        for path in ("/api/scans/visit/good", "/api/projection/visit/good", "/api/curves/visit/good", "/api/frame/visit/good?frame=0"):
            assert get(web.url(path)).status == 200, path  # the good store's pages, once, before the baseline
        baseline = web.peak_rss_mib()

        for case, (relative, _, api, words) in CASES.items():
            scan_id = f"visit/{case}"
            for path in (api.format(id=scan_id), f"/api/scans/{scan_id}", f"/api/frame/{scan_id}?frame=0", f"/api/projection/{scan_id}",
                         f"/api/curves/{scan_id}"):
                took, status, body = timed_get(web, path)
                assert took < ANSWER_S, (case, path, took)
                assert status != 500, (case, path, body[:300])
            took, status, body = timed_get(web, api.format(id=scan_id))
            assert status == 409, (case, status, body[:300])
            message = json.loads(body)["error"]
            assert "\n" not in message and words in message and relative.split("/")[-1] in message, (case, message)
            assert str(site.secret) not in message  # where a link leads is not said either

        # nothing of the other visit's store was served where its files were linked
        curves = get(web.url("/api/curves/visit/swap-volume")).json()  # the curves answer what they have: none, and why
        assert curves["series"] == [] and curves["frames_covered"] == 0 and "symbolic link" in curves["problem"]
        secret_sums = StoreReader(site.secret).table(schema.PEAKS)["intensity_sum"]
        detail = get(web.url("/api/scans/visit/swap-sums"))
        assert detail.status == 409 and str(float(secret_sums[0])).encode()[:8] not in detail.body

        # the list answers, names each bad store's problem, and the monitor keeps looking (a new store appears)
        shutil.copytree(site.good, site.root / "visit" / "late.zarr")
        deadline = time.monotonic() + 20
        while True:
            took, status, body = timed_get(web, "/api/scans")
            assert status == 200 and took < ANSWER_S
            listed = {scan["id"]: scan for scan in json.loads(body)["scans"]}
            if "visit/late" in listed or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "visit/late" in listed, "the monitor stopped looking at the stores"
        for case in ("zero-done", "fifo-done", "big-done", "swap-folder", "zero-metadata"):
            problem = listed[f"visit/{case}"]["problem"]
            assert problem is not None and "\n" not in problem and CASES[case][3] in problem, (case, problem)

        # the good store still answers with its own values
        reader = StoreReader(site.good)
        good = get(web.url("/api/scans/visit/good")).json()
        assert good["frames_done"] == reader.done_frames().size == 6
        np.testing.assert_allclose(np.array(good["peaks_table"]["rows"], dtype=float)[:, 0], reader.table(schema.PEAKS)["id"])
        peak = web.peak_rss_mib()
        assert web.process.poll() is None, web.log.read_text()[-2000:]
        print(f"web process peak RSS: {baseline:.0f} MiB before the bad stores, {peak:.0f} MiB after")
        assert peak - baseline < RSS_GROWTH_MIB, (baseline, peak)


def test_a_quick_look_that_is_not_a_regular_file_is_refused(site: Site, tmp_path: Path) -> None:
    visit = site.root / "visit"
    os.symlink("/dev/zero", visit / "zero-done.quicklook.png")
    os.mkfifo(visit / "fifo-done.quicklook.png")
    with web_process([site.root], tmp_path / "web.log", memory_limit_mib=MEMORY_LIMIT_MIB) as web:
        for case in ("zero-done", "fifo-done"):
            took, status, body = timed_get(web, f"/api/quicklook/visit/{case}")
            assert took < ANSWER_S and status == 404, (case, status, body[:200])
