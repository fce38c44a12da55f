#!/usr/bin/env bash
# A GPU check that fits a short lease (about 5 minutes on a 16-core node with one GPU), for a
# machine without network whose Python stack is not this project's (its own Python, torch with
# CUDA, transformers, NCCL from PyPI; mpi4py may lack an MPI library). Never part of CI.
#
#   1. inspect  the GPU, Python, torch/CUDA, transformers, nvcc, cmake, NCCL (nvidia-nccl wheel)
#   2. horovod  build Horovod 0.28.1 from the sdist the tree carries (third_party/), with this
#               tree's patches (bf16 included), Gloo + NCCL, no MPI, against the machine's torch
#   3. hvdllm   install this tree without dependencies (the machine's torch/transformers stay)
#   4. nccl     a 1-rank NCCL all-reduce of fp32, fp16 and bf16 CUDA tensors (scripts/gpu-check/
#               allreduce.py): exact sums, the bf16 scaling kernel, a 256 MiB all-reduce's time
#   5. train    the GPT-2 124M job (jobs/gpt2-124m.toml) in bf16 on one GPU for STEPS steps on the
#               prepared tokens the tree carries (scripts/gpu-check/tokens: the Python 3.11
#               standard library, GPT-2-sized 50,257-token BPE): tokens/s, MFU, peak memory
#
# Prints one summary table; writes everything under $OUT (default /tmp/hvdllm-gpu-check):
# gpu-check.log, summary.json, the run directory. Environment: PYTHON (default python3),
# STEPS (default 40), HVDLLM_CUDA_ARCHS (default: the GPU's compute capability), CHECK_STEPS
# (default "inspect horovod hvdllm nccl train": a later step needs the earlier ones' $OUT).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/hvdllm-gpu-check}
PY=${PYTHON:-python3}
STEPS=${STEPS:-40}
SITE=$OUT/site   # Horovod (pip --target: each install gets its own directory, since an
APP=$OUT/app     # --upgrade into a shared one replaces its bin/); hvdllm
LOG=$OUT/gpu-check.log
mkdir -p "$OUT"
: > "$LOG"
ROWS=()

say() { printf '[gpu-check] %s\n' "$*" | tee -a "$LOG" >&2; }
die() { say "error: $*"; exit 1; }
pip_() { "$PY" -m pip "$@" >> "$LOG" 2>&1; }
# shellcheck source=scripts/setup-gpu.sh
. "$ROOT/scripts/setup-gpu.sh"  # nvcc_bin, nvcc_cuda, cuda_archs, nccl_home, torch_cuda

summary() {
    # One table of every step that ran; summary.json beside it.
    printf '\n| step | result | seconds | detail |\n|---|---|---|---|\n'
    printf '%s\n' "${ROWS[@]}"
    "$PY" - "$OUT/summary.json" "${ROWS[@]}" <<'PYEOF'
import json, sys
rows = [[c.strip() for c in r.strip("|").split("|")] for r in sys.argv[2:]]
json.dump([dict(zip(("step", "result", "seconds", "detail"), r)) for r in rows],
          open(sys.argv[1], "w"), indent=1)
PYEOF
}
trap summary EXIT

step() {
    # step NAME FUNCTION: run it, time it, record a row; a failed step ends the check.
    local name=$1 fn=$2 start detail rc
    start=$(date +%s)
    say "== $name"
    detail=$("$fn" 2>>"$LOG"); rc=$?
    ROWS+=("| $name | $([ $rc -eq 0 ] && echo ok || echo FAILED) | $(( $(date +%s) - start )) | ${detail//|//} |")
    [ $rc -eq 0 ] || { say "$name failed (rc $rc): the log's tail:"; tail -n 25 "$LOG" >&2; exit 1; }
}

cause() {
    # The first error a rank printed (horovodrun's own "one or more processes exited" left out).
    grep -E "Error|error:" "$LOG" | grep -v "Horovod detected that one or more" | head -n1 | cut -c1-200
}

inspect() {
    local gpu torch_line tf nccl
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n1)
    [ -n "$gpu" ] || { echo "no GPU (nvidia-smi)"; return 1; }
    torch_line=$("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")') \
        || { echo "no torch for $PY"; return 1; }
    [ -n "$(torch_cuda)" ] || { echo "$torch_line: a CPU build"; return 1; }
    tf=$("$PY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null) || tf="missing"
    [ -x "$(nvcc_bin)" ] || { echo "$torch_line; no nvcc (HOROVOD_CUDA_HOME, CUDA_HOME, /usr/local/cuda, PATH)"; return 1; }
    [ "$(nvcc_cuda | cut -d. -f1)" = "$(torch_cuda | cut -d. -f1)" ] \
        || { echo "torch CUDA $(torch_cuda) but nvcc $(nvcc_cuda): CUDA majors differ"; return 1; }
    command -v cmake >/dev/null || "$PY" -c 'import cmake' 2>/dev/null || { echo "no cmake"; return 1; }
    nccl=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null) || { echo "no nvidia-nccl wheel"; return 1; }
    echo "$gpu; $torch_line; transformers $tf; nvcc $(nvcc_cuda); NCCL at $nccl; archs $(cuda_archs)"
}

build_horovod() {
    local src=$OUT/src nccl cuda_home p
    rm -rf "$src" "$OUT/dist" && mkdir -p "$src"
    tar -xzf "$ROOT/third_party/horovod-0.28.1.tar.gz" -C "$src" || { echo "cannot unpack the sdist"; return 1; }
    src=$src/horovod-0.28.1
    for p in $(find "$ROOT/patches/horovod" -maxdepth 1 -name '*.patch' | LC_ALL=C sort); do
        patch -d "$src" -p1 --forward --batch --fuzz=0 --quiet < "$p" >> "$LOG" 2>&1 \
            || { echo "patch $(basename "$p") does not apply"; return 1; }
    done
    nccl=$(nccl_home) || { echo "NCCL headers/library not found"; return 1; }
    cuda_home=$(dirname "$(dirname "$(nvcc_bin)")")
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_NVTX=1 \
    HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$cuda_home" HOROVOD_NCCL_LINK=SHARED \
    HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$nccl/lib" \
    HOROVOD_BUILD_CUDA_CC_LIST="$(cuda_archs)" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    MAKEFLAGS=-j"$(nproc)" PATH="$cuda_home/bin:$PATH" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$OUT/dist" "$src" >> "$LOG" 2>&1 \
        || { echo "build failed at: $(grep -v subprocess-exited "$LOG" | grep -m1 -E 'CMake Error|error:|undefined reference')"; return 1; }
    pip_ install -q --no-deps --upgrade --target "$SITE" "$OUT"/dist/horovod-*.whl || { echo "wheel did not install"; return 1; }
    "$SITE/bin/horovodrun" --check-build >> "$LOG" 2>&1
    grep -A12 "Tensor Operations" "$LOG" | grep -q "\[X\] NCCL" || { echo "built without NCCL"; return 1; }
    echo "Gloo + NCCL, CUDA $(nvcc_cuda), sm_$(cuda_archs)"
}

install_hvdllm() {
    pip_ install -q --no-deps --no-build-isolation --upgrade --target "$APP" "$ROOT" || { echo "pip install failed"; return 1; }
    "$PY" -c 'import hvdllm.cli, horovod.torch' || { echo "hvdllm does not import"; return 1; }
    echo "hvdllm $("$PY" -c 'from importlib.metadata import version; print(version("hvdllm"))') into $APP, no dependencies"
}

nccl_allreduce() {
    "$SITE/bin/horovodrun" --gloo -np 1 -H localhost:1 \
        "$PY" "$ROOT/scripts/gpu-check/allreduce.py" "$OUT/allreduce.json" >> "$LOG" 2>&1 \
        || { echo "horovodrun failed: $(cause)"; return 1; }
    "$PY" - "$OUT/allreduce.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
checks = {k: v for d in ("float32", "float16", "bfloat16") for k, v in
          ((f"{d}.{c}", ok) for c, ok in r[d].items())}
bad = [k for k, ok in checks.items() if not ok]
print(f"NCCL {r['nccl_built']} on {r['device']}: {len(checks) - len(bad)}/{len(checks)} exact"
      f"{' (failed: ' + ', '.join(bad) + ')' if bad else ''}; 256 MiB all-reduce "
      f"{r['allreduce_256MiB_ms']:.2f} ms")
sys.exit(1 if bad else 0)
PYEOF
}

train_gpt2() {
    "$SITE/bin/horovodrun" --gloo -np 1 -H localhost:1 "$APP/bin/hvdllm" train "$ROOT/jobs/gpt2-124m.toml" \
        --set data.dir="$ROOT/scripts/gpu-check/tokens" --set run.dir="$OUT/run" \
        --set training.steps="$STEPS" --set training.micro_batch_size=16 \
        --set training.global_batch_size=16 --set training.log_every=10 \
        --set training.eval_batches=1 >> "$LOG" 2>&1 || { echo "training failed: $(cause)"; return 1; }
    "$PY" - "$OUT/run" <<'PYEOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if "tokens_per_s" in r]
last, info = steps[-1], json.loads((run / "run_info.json").read_text())
print(f"{info['parameters_on_rank0'] / 1e6:.1f}M params bf16, steps {last['step'] - 9}-{last['step']}: "
      f"{last['tokens_per_s']:,.0f} tokens/s, {last['step_ms']:.0f} ms/step, MFU {100 * last['mfu']:.1f}%, "
      f"peak {last.get('memory_peak_mb', 0) / 1024:.1f} GiB; loss {steps[0]['loss']:.2f} -> {last['loss']:.2f}")
PYEOF
}

export PYTHONPATH="$APP:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$APP/bin:$SITE/bin:$PATH"
declare -A FUNCTION=([inspect]=inspect [horovod]=build_horovod [hvdllm]=install_hvdllm
                     [nccl]=nccl_allreduce [train]=train_gpt2)
for name in ${CHECK_STEPS:-inspect horovod hvdllm nccl train}; do
    [ -n "${FUNCTION[$name]:-}" ] || die "unknown step '$name' in CHECK_STEPS (inspect horovod hvdllm nccl train)"
    step "$name" "${FUNCTION[$name]}"
done
