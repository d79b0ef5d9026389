#!/usr/bin/env bash
# The GPU check (issue 13): one prepared script for a bare CUDA machine and a fresh clone. It
# installs the project with the README's command into a fresh virtual environment, then runs the
# four steps of benchmarks/gpu_check.py, each under its own time limit (7.7 minutes in all; the
# install comes on top, a few seconds when the wheels are in pip's cache), and writes JSON +
# Markdown under docs/benchmarks/gpu/ (a step that fails or runs out of time is listed in
# failures.txt and the others still run):
#   1. correctness  every CUDA backend (reference, chunked, fused, triton) against reference in
#                   float64: outputs and the five gradients, float32 and bfloat16 inputs
#   2. layer        attention forward + backward time and peak memory at 28, 56, 112 and 100x168
#                   against content-only flash SDPA (head dims padded to 16); goal triton <= 1.3x
#                   the floor at 56x56 in bfloat16
#   3. models       aa_resnet50 vs resnet50 training images/s (bfloat16, channels_last, eager and
#                   torch.compile); goal >= 0.9x
#   4. detection    50 RetinaNet steps at 800x1333, batch 2, aa_resnet50 backbone: peak memory;
#                   goal: it fits
# Usage:  bash benchmarks/gpu_check.sh                      # on the GPU machine
#         bash benchmarks/gpu_check.sh --device cpu --smoke # tiny shapes on a CPU: the script runs
# Environment: AA_GPU_CHECK_VENV=<existing venv> skips the install (an offline machine);
#              AA_GPU_CHECK_OUT=<dir> writes elsewhere than docs/benchmarks/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${AA_GPU_CHECK_OUT:-docs/benchmarks/gpu}"
mkdir -p "$OUT"
rm -f "$OUT/failures.txt"
start=$(date +%s)

if [[ -n "${AA_GPU_CHECK_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$AA_GPU_CHECK_VENV/bin/activate"
else
    VENV="$(mktemp -d)/venv"
    python3 -m venv "$VENV"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    # The README's install command (keep the two in sync):
    pip install -e ".[dev]" || { echo "install failed" >> "$OUT/failures.txt"; exit 1; }
fi
export NO_ALBUMENTATIONS_UPDATE=1

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

step() {  # step <name> <seconds> [args...]
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    if ! timeout "$limit" python benchmarks/gpu_check.py "$name" --out-dir "$OUT" "$@"; then
        echo "$name: failed or ran out of time (limit ${limit} s)" | tee -a "$OUT/failures.txt"
    fi
}

step correctness 100 "$@"  # includes the JIT builds of the triton kernels (about a second each)
step layer 80 "$@"
step models 200 "$@"  # includes two inductor compilations
step detection 80 "$@"

{
    echo "# GPU check"
    echo
    echo "\`bash benchmarks/gpu_check.sh $*\` in $(( $(date +%s) - start )) s."
    echo
    echo '```'
    cat "$OUT/machine.txt"
    echo '```'
    for name in correctness layer models detection; do
        [[ -f "$OUT/$name.md" ]] && { echo; echo "## $name"; echo; cat "$OUT/$name.md"; }
    done
    [[ -f "$OUT/failures.txt" ]] && { echo; echo "## failures"; echo; cat "$OUT/failures.txt"; }
} > "$OUT/README.md"
echo "wrote $OUT/README.md"
[[ ! -f "$OUT/failures.txt" ]]
