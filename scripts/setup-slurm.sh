#!/usr/bin/env bash
# Test-only dependencies for the Slurm tests (tests/test_slurm.py): Debian's Slurm (slurmctld,
# slurmd, sbatch/srun with the PMIx plugin), munge (Slurm's authentication) and shellcheck (the
# rendered sbatch scripts are linted), and iproute2 for the multi-host tests' namespace hosts
# (tests/test_multihost.py). `make test` runs this; the runtime needs none of it, so
# scripts/setup.sh does not install it. Idempotent: does nothing when everything is installed.
set -euo pipefail

say() { printf '[setup-slurm] %s\n' "$*" >&2; }

missing=()
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
command -v munged >/dev/null || missing+=(munge)
command -v shellcheck >/dev/null || missing+=(shellcheck)
# The multi-host tests (tests/test_multihost.py) make network namespaces: ip, tc (iproute2).
command -v tc >/dev/null || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    say "skipped: no apt-get to install ${missing[*]}; the Slurm tests will be skipped"
    exit 0
fi
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
say "installing ${missing[*]} from Debian (test dependencies)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
