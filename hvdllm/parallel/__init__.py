"""Distributed pieces: the rank grid, Horovod data parallelism, pipeline stages and schedules.

Nothing in here knows about data, metrics or job files beyond the numbers it is given.
"""
