"""Launching hvdllm: sbatch scripts for Slurm (slurm.py) and checks that a launch can work (checks.py)."""
