"""A reader of a table sees one whole generation of it, while the sink rewrites it.

Tables (`peaks`, `tlm/detections`) are rewritten whole as a scan goes on: peaks grow, new rows
come. Read while being rewritten, they used to come back torn: columns of different lengths, or of
equal lengths from two generations. Here another process rewrites the peaks table as often as a
daemon may (every `output.refresh_tables_s` at its lower bound, 0.1 s), every column of generation g
holding g in each of its 1 + g % 7 rows, while this process reads it through `StoreReader.table`:
every read must be one generation, whole.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from pipeline.common.nexus import ScanInfo
from pipeline.store import StoreReader, schema
from pipeline.store.writer import ScanStore

REWRITER = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path
    import numpy as np
    import zarr
    from pipeline.config import MIN_TABLE_REFRESH_S
    from pipeline.store import schema
    from pipeline.store.writer import ScanStore
    writer = ScanStore(Path(sys.argv[1]), zarr.open_group(sys.argv[1], mode="r+", use_consolidated=False), (12, 17))
    generation = 1
    while True:
        rows = 1 + generation % 7
        writer.write_tables({column: np.full(rows, generation, dtype=np.float64) for column in schema.PEAK_COLUMNS})
        generation += 1
        time.sleep(MIN_TABLE_REFRESH_S)  # the fastest a daemon rewrites
""")


def test_reads_during_rewrites_see_one_whole_generation(tmp_path: Path) -> None:
    path = tmp_path / "scan.zarr"
    ScanStore._create(path, _info(tmp_path), (12, 17), {}).write_tables({column: np.zeros(1) for column in schema.PEAK_COLUMNS})
    rewriter = subprocess.Popen([sys.executable, "-c", REWRITER, str(path)])
    reads, torn, generations = 0, 0, set()
    try:
        reader = StoreReader(path)
        initial = reader._table_generation(schema.PEAKS) or 0  # the store's own first writes, before the rewriter's
        started = time.monotonic() + 60.0  # the rewriter's start-up (imports) is not part of the window, however loaded the machine
        while (reader._table_generation(schema.PEAKS) or 0) < initial + 4 and time.monotonic() < started:
            time.sleep(0.01)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            table = reader.table(schema.PEAKS)
            reads += 1
            lengths = {len(values) for values in table.values()}
            values = set(np.unique(np.concatenate(list(table.values()))).tolist())
            if len(lengths) != 1 or len(values) != 1:
                torn += 1
                continue
            (generation,) = values
            assert lengths == {1 + int(generation) % 7} or generation == 0  # the rows that generation has
            generations.add(generation)
    finally:
        rewriter.kill()
        rewriter.wait()
    assert rewriter.returncode is not None
    print(f"{reads} reads, {torn} torn, {len(generations)} generations seen")
    assert reads >= 20 and len(generations) >= 5  # the rewriter really rewrote while we read
    assert torn == 0, f"{torn} of {reads} reads mixed generations or lengths"


def test_a_read_mid_write_meets_zarrs_temporary_file_without_a_warning(tmp_path: Path) -> None:
    """zarr writes each metadata document to `<name>.<uuid>.partial` and renames it into place. A read that listed the
    table's folder then (a web view refreshing during a live scan) printed `ZarrUserWarning: Object at
    zarr.<uuid>.partial is not recognized` to the server's log (CI saw it); the columns are read by name instead."""
    path = tmp_path / "scan.zarr"
    peaks = {column: np.full(3, 5.0) for column in schema.PEAK_COLUMNS}
    ScanStore._create(path, _info(tmp_path), (12, 17), {}).write_tables(peaks)
    for table in schema.TABLES:  # as zarr leaves it mid-write of the table's zarr.json
        (path / table / f"zarr.{uuid.uuid4().hex}.partial").write_bytes(b'{"zarr_format": 3, "node_type": "gr')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = StoreReader(path)
        tables = {table: read.table(table) for table in schema.TABLES}
    assert [str(w.message) for w in caught] == []
    assert list(tables[schema.PEAKS]) == list(schema.PEAK_COLUMNS)
    assert all(values.tolist() == [5.0] * 3 for values in tables[schema.PEAKS].values())
    assert list(tables[schema.TLM_DETECTIONS]) == list(schema.DETECTION_COLUMNS)
    assert all(len(values) == 0 for values in tables[schema.TLM_DETECTIONS].values())


def _info(tmp_path: Path) -> ScanInfo:
    return ScanInfo(nexus_path=tmp_path / "scan.nxs", scan_id="scan", layout="gda9", entry="entry", source_file=tmp_path / "scan.nxs",
                    dataset="/entry/data", scan_command="scan", expected_frames=None, axis_name="eta")
