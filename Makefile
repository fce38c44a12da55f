# The two commands of the README: `make test` and `make demo`. Both set up first (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
RANKS  ?= 2
# OpenMPI refuses root and more ranks than cores unless told; on CPU its progress engine must
# yield the cores it spins on, or a 2-rank run loses ~30 % (docs/launching.md).
MPIRUN := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np $(RANKS) \
          --oversubscribe --bind-to none --mca mpi_yield_when_idle 1

.PHONY: setup test demo clean
setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/setup-slurm.sh  # test-only: Slurm, munge, shellcheck for tests/test_slurm.py
	$(PY) -m pytest tests

demo: setup
	$(VENV)/bin/hvdllm prepare jobs/quickstart.toml
	$(MPIRUN) $(VENV)/bin/hvdllm train jobs/quickstart.toml
	$(VENV)/bin/hvdllm export runs/quickstart runs/quickstart/export
	$(VENV)/bin/hvdllm generate runs/quickstart/export --prompt "def "

clean:
	rm -rf runs
