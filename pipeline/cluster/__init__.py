"""Workers on a facility's batch scheduler: jobs the daemon submits, watches and cancels itself (SLURM: `slurm`)."""

from pipeline.cluster.slurm import SlurmWorkers

__all__ = ["SlurmWorkers"]
