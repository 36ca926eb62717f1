"""Launching runs: sbatch rendering and submission, torchrun wrappers, preemption and requeue."""
