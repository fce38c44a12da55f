"""`hvdllm bench`: throughput of layouts and precisions against a torch DDP peer, and its report.

Modules, each importing only those before it:
  configs   the rows (which launches, against which baseline)
  launcher  mpirun with the local MPI environment (hvdllm.launch.env) and a time limit
  ddp_peer  the torch DDP training step, run by `python -m hvdllm.bench.ddp_peer` under mpirun
  cases     the two case studies (fp32 vs bf16; SGD vs momentum vs AdamW)
  report    bench.json, bench.md, bench.png
  runner    bench(): every launch, alternating, and the summary
  memory_rows  bench --memory: per-rank peak (measured and predicted) and step time by layout
  data_prep    bench --data: data preparation rows
  network      bench --hosts: data parallelism on namespace hosts over shaped links
  plan_rows    bench --plan: the planner's predictions against measured layouts (hvdllm.plan)
"""

from hvdllm.bench.report import markdown
from hvdllm.bench.runner import bench

__all__ = ["bench", "markdown"]
