"""Launching hvdllm: sbatch scripts for Slurm (slurm.py), checks that a launch can work (checks.py)."""
