"""Seeing inside a run: step spans (spans.py), the pipeline chart (gantt.py), profiler traces
and Horovod's timeline (tracing.py)."""
