# The two commands of the README: `make test` and `make demo`. Both set up first (idempotent).
# `make test-unit`, `test-mpi`, `test-slurm`, `test-bench`, `test-multihost`, `test-elastic` run one group of
# tests (pytest -m).
VENV   ?= .venv
PY     := $(VENV)/bin/python
RANKS  ?= 2
PYTEST := $(PY) -m pytest tests --durations=15
# OpenMPI refuses root and more ranks than cores unless told; on CPU its progress engine must
# yield the cores it spins on, or a 2-rank run loses ~30 % (docs/launching.md). The settings are
# defined once, in hvdllm/launch/env.py, and passed as environment variables.
MPIRUN := env $$($(PY) -m hvdllm.launch.env) mpirun -np $(RANKS)

.PHONY: setup setup-slurm gpu-build-check test test-unit test-mpi test-slurm test-bench test-multihost test-elastic demo clean
setup:
	@bash scripts/setup.sh

# Opt-in, never part of CI (downloads the CUDA torch, ~4 GB): proves the GPU build (NCCL, CUDA
# kernels, bf16) compiles and links here, in its own venv; needs nvcc, not a GPU.
gpu-build-check:
	@VENV=$(CURDIR)/.venv-gpu HVDLLM_DEVICE=cuda bash scripts/setup.sh
	.venv-gpu/bin/horovodrun --check-build

setup-slurm:
	@bash scripts/setup-slurm.sh  # test-only: Slurm, munge, shellcheck for tests/test_slurm.py

test: setup setup-slurm
	$(PYTEST)

test-unit: setup
	$(PYTEST) -m unit

test-mpi: setup
	$(PYTEST) -m mpi

test-slurm: setup setup-slurm
	$(PYTEST) -m slurm

test-bench: setup
	$(PYTEST) -m bench

test-multihost: setup setup-slurm
	$(PYTEST) -m multihost

test-elastic: setup
	$(PYTEST) -m elastic

demo: setup
	$(VENV)/bin/hvdllm prepare jobs/quickstart.toml
	$(MPIRUN) $(VENV)/bin/hvdllm train jobs/quickstart.toml --resume auto  # again: continues, never mixes
	$(VENV)/bin/hvdllm export runs/quickstart runs/quickstart/export
	$(VENV)/bin/hvdllm generate runs/quickstart/export --prompt "def "

clean:
	rm -rf runs
