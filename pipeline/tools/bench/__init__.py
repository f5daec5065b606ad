"""`pipeline bench`: speed and scale, measured, with DiPID's way of running the models beside ours.

One run writes a simulated scan live (`ScanWriter`, other processes, real SWMR files) and measures:

- **baseline**: DiPID's joint predictor way, one frame at a time in this one process: open the
  file (h5py, SWMR read), read the frame, fix dead pixels with DiPID's per-pixel loop, run each
  model on the one frame with the TLM at torchvision's default resize (shorter side 800, longer
  at most 1333), save the result with `np.savez`. Run on the finished scan, after the live part,
  so that it neither competes with the pipeline for the CPU nor inflates the daemon's memory.
- **pipeline**: the real `Daemon` in this process, watching a temporary directory, with local
  worker processes, following the scan while it is written. Each frame's timings come from the
  daemon's `on_frame_done` hook. A frame's flush time is when this process saw the writer's
  shared frame counter pass it (polled every 2 ms, so a few ms late at worst).
- **scaling**: the pipeline part again with other worker counts.

This process stays free of torch until the baseline runs (after every pipeline run): the torch
facts come from a short child process and the weights are checked from their headers, so the
daemon's RSS in the table is the daemon's, not a daemon plus a loaded torch.

Figures are printed as a table; `--json` keeps all of them (and every frame's timings) and
`--memory-trace` the RSS samples that show whether the daemon's memory stays flat.

Where each part lives:

- `command`: the command line: its defaults, `worker_counts`, `add_parser`, `run_bench`, the
  bench's config, `bench` (every part the arguments ask for, in order) and `main`;
- `machine`: what the figures were measured on: `torch_facts` (from a child process),
  `check_weights` (from the weights' headers), `machine_description`;
- `measure`: the instruments: `percentiles_ms`, `mean_ms`, `MemorySampler` (RSS and CPU per
  process), `thread_cpu_s` (the daemon's CPU by thread), `FlushClock` (when each frame was flushed);
- `pipeline_run`: the daemon's part: `PipelineRun` and `run_pipeline`;
- `baseline`: DiPID's way: `run_baseline`;
- `report`: `format_report`, the figures as a table;
- `errors`: `BenchError`, a problem the user can fix; `progress`: `progress_bar`;
- `stand_in_worker`: the `--models threshold` workers; `flop_floor`: the models' FLOPs against the CPU's matrix
  product rate (`scripts/onnx_bench.py` prints it).
"""

from __future__ import annotations

from pipeline.tools.bench.command import add_parser, bench, main, run_bench, worker_counts
from pipeline.tools.bench.errors import BenchError
from pipeline.tools.bench.measure import mean_ms, percentiles_ms
from pipeline.tools.bench.report import format_report

__all__ = ["BenchError", "add_parser", "bench", "format_report", "main", "mean_ms", "percentiles_ms", "run_bench", "worker_counts"]
