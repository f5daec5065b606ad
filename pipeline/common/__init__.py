"""What every part of the pipeline shares: facts about the data and small helpers of the command line.

- `detector`: the Pilatus 100K's frame, dead and saturated pixels.
- `nexus`: what a scan file says (layout, scan axis, frames expected) as I16's NeXus files say it.
- `chunks`, `shared_datasets`: reading HDF5 chunks and sharing a detector file between scans.
- `volume`: linking per-frame masks into 3D peaks.
- `devices`: choosing the device the models run on.
- `argtypes`, `stop_signals`: the command line's argument checks and its handling of Ctrl-C and SIGTERM.

The package root keeps the entry points only: `cli` (the command line), `config`, `errors`, `logs`.
"""
