"""Run under mpirun -np 2: one Horovod all-reduce on top of mpi4py's MPI.

Usage: allreduce.py OUT. Each rank writes {"rank", "size", "sum"} as JSON to OUT.rank{R}: its own
file, because several ranks' lines on mpirun's merged stdout can interleave.
"""
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
from mpi4py import MPI

out = sys.argv[1]
hvd.init(comm=MPI.COMM_WORLD)
t = torch.tensor([1.0, 10.0]) * (hvd.rank() + 1)
total = hvd.allreduce(t, op=hvd.Sum)
result = {"rank": hvd.rank(), "size": hvd.size(), "sum": total.tolist()}
Path(f"{out}.rank{hvd.rank()}").write_text(json.dumps(result))
