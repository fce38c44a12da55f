"""Run under mpirun -np 2: one Horovod all-reduce on top of mpi4py's MPI."""
import horovod.torch as hvd
import torch
from mpi4py import MPI

hvd.init(comm=MPI.COMM_WORLD)
t = torch.tensor([1.0, 10.0]) * (hvd.rank() + 1)
total = hvd.allreduce(t, op=hvd.Sum)
print(f"rank {hvd.rank()} of {hvd.size()}: {total.tolist()}", flush=True)
