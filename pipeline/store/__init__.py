"""The Zarr store of one scan: its schema (defined once), its one writer, its reader, its provenance."""
