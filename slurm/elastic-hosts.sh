#!/bin/bash
# Host discovery for horovodrun's elastic mode inside a Slurm allocation (docs/elastic.md):
# prints "NODE:SLOTS" for every node of this job that Slurm still counts as usable, SLOTS being the
# job's tasks per node. A node that is down, drained, draining or failing is left out, so
# `scontrol update NodeName=N State=DRAIN Reason=...` takes it out of the job at the next commit.
# horovodrun runs this every few seconds (--host-discovery-script).
set -euo pipefail

slots=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
slots=${slots%%[(,]*}  # SLURM_TASKS_PER_NODE reads like "2(x3)" or "2,1": the first node's count

while read -r node; do
    state=$(sinfo --noheader --nodes="$node" --format=%t | head -n 1)
    case "$state" in
        ""|down*|drain*|drng*|fail*|maint*|boot*|unk*) ;;  # not usable (or not known to sinfo)
        *) echo "${node}:${slots}" ;;
    esac
done < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
