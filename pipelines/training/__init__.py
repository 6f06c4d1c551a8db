"""The training runtime every task shares: the runner (checks, relaunch, resume, epoch loop), launch
(torchrun, DDP), cluster (submitit/Slurm), run identity, the method/optimiser factory, checkpoints, seeding,
and the epoch bookkeeping (epoch.py) tasks would otherwise copy. A task is a ``runner.Task`` subclass."""
