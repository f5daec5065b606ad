"""The web view's JSON API and pictures against the stores' own contents, and what it refuses to serve.

One real uvicorn server (the `pipeline web` server, in this process on a free port) over one root of
stores written by the project's writer (`pipeline.testing.truth_stores`: a finished scan with known
peaks, a scan still being written, a failed scan's bare store) and of traps: a store that is a link
to a store outside the root, a folder that is a link out of it, a store planted in the root whose
raw file and quick look lie outside. Every value the API gives is compared with what
`pipeline.store.StoreReader` (or the quick look's own computation) reads from the store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.pictures.quicklook import peak_colour, quicklook_data, write_quicklook
from pipeline.store import StoreReader, schema
from pipeline.store.writer import mark_failed
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.truth_stores import TruthStoreWriter
from pipeline.testing.web import Answer, colour_share, events, get, raw_get, web_server
from pipeline.web.render import BOX_COLOUR, SSL_COLOUR, TLM_COLOUR, ZOOM, boundary, grey
from pipeline.web.summary import epoch

FRAME_PIXELS = (195 * ZOOM, 487 * ZOOM)


class Site:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.outside = base / "outside"
        (self.root / "visit").mkdir(parents=True)
        self.outside.mkdir()
        done = TruthStoreWriter(self.root / "visit", "done", 12, seed=3, n_peaks=2)
        done.write(12)
        done.finish()
        self.done = done.store_path
        write_quicklook(self.done)
        self.live_writer = TruthStoreWriter(self.root / "visit", "live", 20, seed=5, n_peaks=3)
        self.live_writer.write(5)
        self.live_writer.store.ensure_frames(8)  # room for frames not done yet, as the daemon's writer makes ahead
        self.live = self.live_writer.store_path
        self.failed = self.root / "failed.zarr"
        mark_failed(self.failed, "failed.nxs: not an HDF5 file", make_parents=True)
        secret = TruthStoreWriter(self.outside, "secret", 4, seed=7, n_peaks=1)
        secret.write(4)
        secret.finish()
        write_quicklook(secret.store_path)
        os.symlink(secret.store_path, self.root / "evil.zarr")  # a store that is a link out of the root
        os.symlink(self.outside, self.root / "linked")  # a folder that is a link out of the root
        shutil.copytree(secret.store_path, self.root / "planted.zarr")  # its raw file is outside the root
        os.symlink(self.outside / "secret.quicklook.png", self.root / "planted.quicklook.png")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("web-api"))


@pytest.fixture(scope="module")
def web(site: Site):  # type: ignore[no-untyped-def]
    with web_server([site.root]) as server:
        yield server


def url(web, path: str) -> str:  # type: ignore[no-untyped-def]
    return f"http://127.0.0.1:{web.port}{path}"


def scans(web) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    answer = get(url(web, "/api/scans"))
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    return {scan["id"]: scan for scan in answer.json()["scans"]}


def one_line_error(answer: Answer, status: int, *words: str) -> str:
    assert answer.status == status, (answer.status, answer.body[:300])
    message = answer.json()["error"]
    assert "\n" not in message and all(word in message for word in words), message
    return message


# -- what is refused (written first) ---------------------------------------------------------------


def test_path_traversal_and_links_out_of_the_roots_are_refused(web, site):
    assert set(scans(web)) == {"visit/done", "visit/live", "failed", "planted"}  # not evil (a link), not linked/secret
    for path in ("/api/scans/..%2F..%2Fetc", "/api/scans/../../etc/passwd", "/api/scans/%2e%2e/%2e%2e/etc/passwd",
                 "/api/scans/..%2Foutside%2Fsecret", "/scans/..%2F..%2Fetc", "/scans/evil", "/api/scans/evil",
                 "/api/scans/linked/secret", "/api/frame/evil?frame=0", "/api/frame/linked/secret?frame=0", "/api/curves/evil",
                 "/api/projection/linked/secret", "/api/quicklook/evil", "/api/stream/evil", "/api/stream/..%2Foutside%2Fsecret",
                 "/static/..%2F..%2F..%2Fpipeline.yaml", "/static/../../etc/passwd"):
        answer = raw_get(web.port, path)
        assert answer.status == 404, (path, answer.status, answer.body[:200])
        assert b"secret" not in answer.body.replace(b"%2Fsecret", b"").replace(b"/secret", b"") and b"root:" not in answer.body, path
    # planted in the root: listed, but its raw pixels and its quick look lie outside and are not read
    one_line_error(get(url(web, "/api/frame/planted?frame=0")), 409, "outside the allowed roots")
    one_line_error(get(url(web, "/api/projection/planted")), 409, "outside the allowed roots")
    one_line_error(get(url(web, "/api/quicklook/planted")), 404, "no quick look")
    assert get(url(web, "/api/curves/planted")).json()["series"] == []


def test_requests_for_a_foreign_host_name_are_refused(web):
    assert raw_get(web.port, "/api/scans", {"Host": "attacker.example"}).status == 400  # DNS rebinding: not a loopback name
    assert raw_get(web.port, "/api/scans", {"Host": f"localhost:{web.port}"}).status == 200


# -- the API against the stores --------------------------------------------------------------------


def test_the_scans_list_is_the_stores_own_contents(web, site):
    listed = scans(web)
    for scan_id, path in (("visit/done", site.done), ("visit/live", site.live)):
        reader = StoreReader(path)
        scan = listed[scan_id]
        done = reader.done_frames()
        assert scan["store"] == str(path) and scan["name"] == path.name.removesuffix(".zarr")
        assert scan["status"] == reader.status and scan["end_reason"] == reader.attrs.get(schema.Attr.END_REASON)
        assert (scan["frames_done"], scan["newest_done"]) == (done.size, int(done[-1]))
        assert scan["frames_expected"] == reader.attrs[schema.Attr.FRAMES_EXPECTED]
        assert scan["peaks"] == len(reader.table(schema.PEAKS).get("id", []))
        assert scan["scan_command"] == reader.attrs[schema.Attr.SCAN_COMMAND] and scan["start_time"] == reader.attrs[schema.Attr.START_TIME]
    assert listed["visit/done"]["status"] == "complete" and listed["visit/done"]["frames_done"] == 12
    assert listed["visit/live"]["status"] == "running"
    failed = listed["failed"]
    assert (failed["status"], failed["end_reason"], failed["frames_done"], failed["problem"]) == (
        "failed", "failed.nxs: not an HDF5 file", 0, None)
    order = [scan["id"] for scan in get(url(web, "/api/scans")).json()["scans"]]
    starts = [epoch(listed[scan_id]["start_time"]) or epoch(listed[scan_id]["end_time"]) for scan_id in order]  # a bare store: its end
    assert starts == sorted(starts, reverse=True)  # newest first


def test_a_scan_detail_is_the_stores_own_contents(web, site):
    detail = get(url(web, "/api/scans/visit/done")).json()
    reader = StoreReader(site.done)
    table = reader.table(schema.PEAKS)
    assert detail["peaks_table"]["columns"] == list(schema.PEAK_COLUMNS)
    rows = np.array(detail["peaks_table"]["rows"], dtype=np.float64)
    assert rows.shape == (len(table["id"]), len(schema.PEAK_COLUMNS)) and rows.shape[0] == 2
    for index, column in enumerate(schema.PEAK_COLUMNS):
        np.testing.assert_allclose(rows[:, index], table[column].astype(np.float64), rtol=1e-12, err_msg=column)
    assert detail["done"] == [[0, 11]] and detail["frames_done"] == 12
    for name, value in detail["attributes"].items():
        assert value == reader.attrs[name], name
    assert detail["axis_name"] == "eta" and detail["quicklook"] is True
    quicklook = get(url(web, "/api/quicklook/visit/done"))
    assert quicklook.status == 200 and quicklook.body == (site.done.parent / "done.quicklook.png").read_bytes()
    live = get(url(web, "/api/scans/visit/live")).json()
    assert live["done"] == [[0, int(StoreReader(site.live).done_frames()[-1])]] and live["quicklook"] is False


def test_every_count_is_frames_done_of_frames_expected(web, site):
    """The list, a scan's detail and its stream give one count with one meaning: frames whose done flag is set, of the
    frames the scan file said to expect. The arrays' allocated length (the writer makes room ahead) is no count."""
    reader = StoreReader(site.live)
    done, expected = reader.done_frames().size, reader.attrs[schema.Attr.FRAMES_EXPECTED]
    assert reader.frames_total > done and expected == 20  # room made ahead: a length that must not show as a count
    listed = scans(web)["visit/live"]
    detail = get(url(web, "/api/scans/visit/live")).json()
    streamed = events(web.port, "/api/stream/visit/live", lambda name, data: name == "scan", timeout=30)[-1][1]["summary"]
    for answer in (listed, detail, streamed):
        assert (answer["frames_done"], answer["frames_expected"]) == (done, expected)
        assert "frames_total" not in answer, answer["frames_total"]
    assert detail["done"] == [[0, done - 1]]


def test_a_failed_scan_says_why_once_and_has_no_pictures(web, site):
    detail = get(url(web, "/api/scans/failed"))
    assert detail.status == 200, detail.body[:300]  # what there is to say about it: its status and why, no frames
    body = detail.json()
    assert (body["status"], body["end_reason"], body["frames_done"], body["done"], body["newest_done"]) == (
        "failed", "failed.nxs: not an HDF5 file", 0, [], None)
    assert body["peaks_table"] == {"columns": [], "rows": []} and body["quicklook"] is False and body["problem"] is None
    assert body["attributes"]["end_reason"] == "failed.nxs: not an HDF5 file"
    for kind in ("curves", "projection"):  # no pictures of a scan without frames: one line why
        one_line_error(get(url(web, f"/api/{kind}/failed")), 409, "nothing to show", "not an HDF5 file")
    one_line_error(get(url(web, "/api/frame/failed")), 409, "no frame is done")


def test_the_daemons_problems_are_in_the_list(site):
    problems = ["watch.dirs /data/visit-9: does not exist", "worker gpu1: exited 3 times in 60 s; not restarted"]
    status = {"pid": 4242, "version": "test", "uptime_s": 5.0, "dispatch": {"workers": [], "queued": 0, "in_flight": 0},
              "waiting_scans": 0, "scans": [], "problems": problems}
    with web_server([site.root], daemon_status=lambda: status) as server:
        daemon = get(f"http://127.0.0.1:{server.port}/api/scans").json()["daemon"]
        assert daemon["pid"] == 4242 and daemon["problems"] == problems
    status["problems"] = [{"not": "a line"}, "two\nlines", "x" * 5000]  # a daemon's nonsense is shown as one line each
    with web_server([site.root], daemon_status=lambda: status) as server:
        shown = get(f"http://127.0.0.1:{server.port}/api/scans").json()["daemon"]["problems"]
        assert len(shown) == 3 and all("\n" not in line and len(line) <= 500 for line in shown) and shown[1] == "two lines"
    del status["problems"]  # a daemon from before the key: none
    with web_server([site.root], daemon_status=lambda: status) as server:
        assert get(f"http://127.0.0.1:{server.port}/api/scans").json()["daemon"]["problems"] == []


def test_a_root_made_after_the_web_view_starts_is_waited_for(tmp_path, site):
    """A visit's folder often appears with its first scan, after the beamline started its web view: `pipeline web` starts
    anyway, says so on its terminal and on the page, and lists the scans once the folder is there."""
    visit = tmp_path / "cm12345-1" / "processed"
    web = subprocess.Popen([sys.executable, "-m", "pipeline", "web", "--root", str(visit), "--port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert web.stdout is not None
        started = web.stdout.readline()
        assert started.startswith(f"live web view of {visit} at http://127.0.0.1:"), started
        assert web.stdout.readline().strip() == f"web root {visit} does not exist yet: its scans are listed once it does"
        base = started.split(" at ")[1].split()[0].rstrip("/")
        waiting = get(f"{base}/api/scans").json()
        assert waiting["problems"] == [f"web root {visit} does not exist (yet): its scans are listed once it does"]
        assert waiting["scans"] == []
        shutil.copytree(site.done, visit / "scan-1.zarr")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listed = get(f"{base}/api/scans").json()
            if listed["scans"]:
                break
            time.sleep(0.2)
        assert [(scan["id"], scan["status"]) for scan in listed["scans"]] == [("scan-1", "complete")]
        assert listed["problems"] == []
    finally:
        web.terminate()
        assert web.wait(timeout=30) == 0


def test_rocking_curves_and_projection_are_the_quick_looks(web, site):
    curves = get(url(web, "/api/curves/visit/done")).json()
    expected = quicklook_data(site.done)
    assert curves["axis_name"] == expected.axis_name == "eta" and curves["frames_covered"] == 12
    assert curves["peak_count"] == len(expected.curves) == 2 and [s["id"] for s in curves["series"]] == expected.peak_ids
    x = np.array(curves["x"])
    assert (np.diff(x) > 0).all()
    for series in curves["series"]:
        curve = expected.curves[series["id"]]
        y = np.array([np.nan if v is None else v for v in series["y"]])
        np.testing.assert_allclose(x[np.isfinite(y)], curve.axis_values)
        np.testing.assert_allclose(y[np.isfinite(y)], curve.sums)
        assert series["total"] == pytest.approx(curve.total)
    answer = get(url(web, "/api/projection/visit/done"))
    assert answer.status == 200 and answer.headers["x-frames-covered"] == "12" and answer.headers["x-peaks"] == "2"
    pixels = answer.image()
    assert pixels.shape == (*FRAME_PIXELS, 3)
    levels = np.repeat(np.repeat(grey(expected.projection), ZOOM, 0), ZOOM, 1)
    coloured = (pixels[:, :, 0] != pixels[:, :, 1]) | (pixels[:, :, 1] != pixels[:, :, 2])  # outlines and numbers
    untouched = ~ndimage.binary_dilation(coloured, iterations=12)  # away from them (and the numbers' dark rims)
    assert untouched.mean() > 0.9
    np.testing.assert_array_equal(pixels[:, :, 0][untouched], levels[untouched])
    for peak_id in expected.peak_ids:  # each peak's outline, in its quick-look colour, around its projected footprint
        colour = tuple(round(c * 255) for c in peak_colour(peak_id)[:3])
        footprint = expected.footprints[peak_id]
        outline = boundary(np.repeat(np.repeat(footprint.mask.astype(np.uint8), ZOOM, 0), ZOOM, 1))
        drawn = np.all(pixels[footprint.y0 * ZOOM:, footprint.x0 * ZOOM:][:outline.shape[0], :outline.shape[1]] == colour, axis=-1)
        assert (drawn & outline).sum() >= 0.9 * outline.sum(), peak_id


def test_a_frame_picture_shows_the_frame_and_its_masks(web, site):
    reader = StoreReader(site.done)
    tlm = reader.array(schema.TLM_LABELS)
    frame = int(np.argmax([np.count_nonzero(tlm[i]) for i in range(12)]))
    answer = get(url(web, f"/api/frame/visit/done?frame={frame}"))
    assert answer.status == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["x-frame"] == str(frame) and answer.headers["x-axis-name"] == "eta"
    assert int(answer.headers["x-instances"]) == len(np.unique(tlm[frame][tlm[frame] > 0]))
    assert int(answer.headers["x-boxes"]) == len(reader.frame_detections(frame).scores)
    pixels = answer.image()
    assert pixels.shape == (*FRAME_PIXELS, 3) and pixels.std() > 10
    for colour in (TLM_COLOUR, SSL_COLOUR, BOX_COLOUR):
        assert colour_share(pixels, colour, tolerance=2) > 0.0005, colour
    bare = get(url(web, f"/api/frame/visit/done?frame={frame}&layers=")).image()
    assert colour_share(bare, TLM_COLOUR, tolerance=2) == 0 and colour_share(bare, BOX_COLOUR, tolerance=2) == 0
    with reader.raw_frames() as dataset:
        raw = dataset[frame]
    np.testing.assert_array_equal(bare[::ZOOM, ::ZOOM, 0], grey(raw, "log"))
    linear = get(url(web, f"/api/frame/visit/done?frame={frame}&scale=linear&layers=")).image()
    np.testing.assert_array_equal(linear[::ZOOM, ::ZOOM, 0], grey(raw, "linear"))
    newest = get(url(web, "/api/frame/visit/done"))
    assert newest.status == 200 and newest.headers["x-frame"] == "11"  # no frame given: the newest done one


def test_bad_requests_get_one_line(web, site):
    one_line_error(get(url(web, "/api/frame/visit/done?frame=99")), 404, "frame 99 is out of range")
    not_done = StoreReader(site.live).frames_total - 1
    assert not_done >= StoreReader(site.live).done_frames().size  # the writer allocates ahead of the done frames
    one_line_error(get(url(web, f"/api/frame/visit/live?frame={not_done}")), 404, f"frame {not_done} is not done yet")
    one_line_error(get(url(web, "/api/frame/visit/done?frame=one")), 400, "whole number")
    one_line_error(get(url(web, "/api/frame/visit/done?scale=sqrt")), 400, "scale must be")
    one_line_error(get(url(web, "/api/frame/visit/done?layers=tlm,glitter")), 400, "glitter")
    one_line_error(get(url(web, "/api/scans/nothing/here")), 404, "no scan 'nothing/here' under the roots")
    one_line_error(get(url(web, "/api/nonsense")), 404, "no such API")


# -- live -------------------------------------------------------------------------------------------


def test_the_streams_follow_a_growing_store(web, site):
    writer = threading.Thread(target=site.live_writer.write, args=(3,))
    before: dict[str, int] = {}

    def until(name: str, data: dict) -> bool:
        if name == "snapshot":
            before.update({scan["id"]: scan["frames_done"] for scan in data["scans"]})
            writer.start()  # the store grows while the stream is open
            return False
        assert name == "update" and data["removed"] == []
        return any(scan["id"] == "visit/live" and scan["frames_done"] == before["visit/live"] + 3 for scan in data["changed"])

    seen = events(web.port, "/api/stream", until, timeout=30)
    writer.join()
    assert seen[0][0] == "snapshot" and len(seen) >= 2
    assert before["visit/live"] == StoreReader(site.live).done_frames().size - 3
    latest = seen[-1][1]["changed"][-1]
    assert latest["frames_done"] == StoreReader(site.live).done_frames().size == 8
    done_frames = StoreReader(site.live).done_frames().size
    scan = events(web.port, "/api/stream/visit/live",
                  lambda name, data: name == "scan" and data["view"]["frames_covered"] == done_frames, timeout=30)[-1][1]
    assert scan["summary"]["id"] == "visit/live" and scan["summary"]["frames_done"] == done_frames
    assert scan["view"]["problem"] is None and scan["view"]["peaks_seen"] == len(quicklook_data(site.live).curves)


# -- the token, the config and the command line -----------------------------------------------------------


def test_a_token_is_asked_of_every_request(site):
    token = "a-long-enough-token-for-tests"
    with web_server([site.root], token=token) as server:
        base = f"http://127.0.0.1:{server.port}"
        refused = get(f"{base}/api/scans")
        assert refused.status == 401 and b"token" in refused.body and refused.body.count(b"\n") == 1
        assert get(f"{base}/api/scans", {"Authorization": "Bearer wrong-token-wrong-token"}).status == 401
        assert get(f"{base}/api/scans", {"Authorization": f"Bearer {token}"}).status == 200
        once = get(f"{base}/scans/visit/done?token={token}&x=1", follow_redirects=False)
        assert once.status == 303 and once.headers["location"] == "/scans/visit/done?x=1"
        cookie = once.headers["set-cookie"].split(";")[0]
        assert "httponly" in once.headers["set-cookie"].lower() and "samesite=strict" in once.headers["set-cookie"].lower()
        page = get(f"{base}/scans/visit/done", {"Cookie": cookie})
        assert page.status == 200 and b"<title>" in page.body


def test_beyond_loopback_needs_a_token_and_bad_arguments_are_one_line(tmp_path, site, capsys):
    config = tmp_path / "web.yaml"
    config.write_text("web:\n  host: 0.0.0.0\n  port: 0\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert str(error.value) == f"{config}: web.token: required when web.host (0.0.0.0) reaches beyond this host; set 16 characters or more"
    config.write_text("web:\n  host: 0.0.0.0\n  token: short\n")
    with pytest.raises(ConfigError, match="web.token: too short") as short:
        load_config(config)
    assert "short\n" not in str(short.value) and "got" not in str(short.value)  # the secret is not echoed
    config.write_text("web:\n  token: a-long-enough-token-for-tests\n")
    assert load_config(config).model_dump(mode="json")["web"]["token"] == "**********"  # stores record the config: not the token

    for argv, message in (
        (["web", "--host", "0.0.0.0", "--root", str(site.root)], "pipeline web: command line: web.token: required when web.host (0.0.0.0)"),
        (["web", "--config", str(tmp_path / "none.yaml")], "pipeline web: " + str(tmp_path / "none.yaml") + ": cannot read config"),
        (["web", "--root", str(config)], f"pipeline web: web root {config}: not a directory"),
        (["web"], "pipeline web: nothing to serve: give --root DIR"),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(message), (argv, err)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["web", "--port", "70000"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["web", "--help"])
    assert exit_info.value.code == 0 and "--root DIR" in capsys.readouterr().out


def test_a_taken_port_stops_pipeline_run_before_it_starts(tmp_path, web):
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, web={"port": web.port})  # the test server holds it
    (tmp_path / "scans").mkdir()
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(tmp_path / "scans")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"pipeline run: web view 127.0.0.1:{web.port}: Address already in use"
