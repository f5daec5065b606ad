"""The Zarr store of one scan: its schema (defined once), its one writer, its reader, its provenance.

`schema` names every array and attribute; `writer.ScanStore` is the only code that writes a
store (from the daemon's sink thread); `reader.StoreReader` is how pictures, tools and scripts
read one, also while it is being written; `location` says where a scan's store goes.
"""

from pipeline.store import schema
from pipeline.store.location import store_made_from, store_path_for
from pipeline.store.reader import StoreError, StoreReader, open_live, read_attributes, store_status, stores_difference

__all__ = ["StoreError", "StoreReader", "open_live", "schema", "read_attributes", "store_made_from", "store_path_for", "store_status",
           "stores_difference"]
