#!/usr/bin/env bash
# The one prepared GPU check (H200): every measurement minispin has not had yet, in priority order,
# inside a wall-clock budget (default 540 s = 9 min). Each step is capped with `timeout`; a step whose
# minimum no longer fits the time left is skipped and says so. Results go to $OUT (at most 8 files):
#   kernels.jsonl logprobs.jsonl train.jsonl generate.jsonl cuda_tests.jsonl pair_loss.jsonl
#   summary.md (versions, GPU, each step's status and key figures)   log.txt (every step's stderr)
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run --out DIR   # every step at smoke size on CPU (~2 min)
#
# Options: --dry-run, --out DIR (default $OUT), --budget SECONDS (default 540), --steps A,B (only the
# steps whose names start with one of these, e.g. after a first run: --steps generate,cuda_tests).
# Environment: PYTHON (default python3). Liger-Kernel and TRL (>= 1.16) wheels in .whl/ are installed to
# scratch folders, and their log-prob kernels timed beside ours (benchmarks/README.md says how to carry them).
set -uo pipefail

DRY=0
BUDGET=540
OUT_DIR="${OUT:-}"
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --steps) ONLY="$2"; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --out DIR, --budget SECONDS, --steps A,B)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  echo "gpu_check.sh: no output folder: set \$OUT or pass --out DIR" >&2; exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi  # steps may cd
START=$(date +%s)
LOG="$OUT_DIR/log.txt"
SUMMARY="$OUT_DIR/summary.md"
: >"$LOG"
STEP_LINES=()
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export TRITON_INTERPRET=0   # compiled kernels; the dry run's kernel step alone sets it to 1
unset MINISPIN_AUTOTUNE

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(date +%s) + START )); }

# step NAME FILE MIN_SECONDS CAP_SECONDS COMMAND...: run COMMAND with stdout appended to FILE and
# stderr to log.txt, capped at min(CAP, time left - 15 s); skipped when less than MIN is left.
step() {
  local name="$1" base="$2" file="$OUT_DIR/$2" min="$3" cap="$4"; shift 4
  local remain=$(( $(left) - 15 ))
  local status rc t0 t1 want
  if [ -n "$ONLY" ]; then
    want=0
    for prefix in ${ONLY//,/ }; do [[ "$name" == "$prefix"* ]] && want=1; done
    [ "$want" -eq 0 ] && return 0
  fi
  if [ "$remain" -lt "$min" ]; then
    status="skipped: ${remain}s left, needs ${min}s"
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"reason\": \"${remain}s left, needs ${min}s\"}" >>"$file"
  else
    [ "$cap" -gt "$remain" ] && cap="$remain"
    echo "=== $name (cap ${cap}s, $(elapsed)s elapsed): $*" | tee -a "$LOG" >&2
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@" >>"$file" 2>>"$LOG"
    rc=$?
    t1=$(date +%s)
    if [ "$rc" -eq 0 ]; then status="ok"; elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      status="timed out after ${cap}s"; else status="failed (exit $rc)"; fi
    echo "{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $(( t1 - t0 )), \"cap_s\": $cap}" >>"$file"
    echo "=== $name: $status in $(( t1 - t0 ))s" | tee -a "$LOG" >&2
  fi
  STEP_LINES+=("| $name | $status | $base |")
}

# ---------------------------------------------------------------- install (offline) and versions
# --use-pep517: without a pyproject.toml an older pip would run `setup.py develop`, whose path entry does
# not map minispin.kernels onto kernels/; the import check below catches any other such layout problem.
INSTALL="pip install --no-deps --no-build-isolation --no-index --use-pep517 -e ."
if [ "$DRY" -eq 1 ]; then
  INSTALL="$INSTALL --dry-run"
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 --dry-run -e . >>"$LOG" 2>&1 \
    || INSTALL="$INSTALL: FAILED (see log.txt)"
elif ! { "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . >>"$LOG" 2>&1 \
         && (cd /tmp && "$PY" -c "import minispin.kernels, minispin" >>"$LOG" 2>&1); }; then
  # no lost GPU minutes over packaging: the same sources, laid out as installed, on PYTHONPATH
  SRC=$(mktemp -d) && cp -r minispin "$SRC/" && cp -r kernels "$SRC/minispin/kernels"
  export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
  INSTALL="$INSTALL FAILED (see log.txt); ran from a source copy on PYTHONPATH"
fi
echo "install: $INSTALL" | tee -a "$LOG" >&2
# Peer kernels for bench_logprobs, pure-Python wheels carried in .whl/: Liger-Kernel, and TRL (>= 1.16, its
# chunked Triton log-prob kernel, whose backward imports TRL's trainer utilities: transformers, accelerate,
# datasets, pandas and huggingface_hub must be on the machine, or bench_logprobs reports trl as skipped).
wheel() {  # wheel PATTERN -> what happened, for the summary
  ls .whl/$1 >/dev/null 2>&1 || { echo "absent"; return; }
  local site; site=$(mktemp -d)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/$1 >>"$LOG" 2>&1; then
    echo "$site"
  else
    echo "wheel in .whl/ failed to install (see log.txt)"
  fi
}
LIGER=$(wheel 'liger_kernel-*.whl'); TRL=$(wheel 'trl-*.whl')
for site in "$LIGER" "$TRL"; do
  [ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
done
[ -d "$LIGER" ] && LIGER="installed from .whl/"
[ -d "$TRL" ] && TRL="installed from .whl/"
VERSIONS=$("$PY" - <<'EOF' 2>>"$LOG"
import importlib.metadata, platform, torch, torch.nn.functional as F
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
print(f"- GPU: {gpu}; CUDA runtime {torch.version.cuda}; python {platform.python_version()}")
print(f"- torch {torch.__version__}, triton {version('triton')}, numpy {version('numpy')}, "
      f"transformers {version('transformers')}, liger_kernel {version('liger-kernel')}, trl {version('trl')}")
print(f"- torch has linear_cross_entropy: {hasattr(F, 'linear_cross_entropy')}")
EOF
)
echo "$VERSIONS" | tee -a "$LOG" >&2

# ---------------------------------------------------------------- the steps, in priority order
if [ "$DRY" -eq 1 ]; then
  step kernels kernels.jsonl 10 120 env TRITON_INTERPRET=1 "$PY" benchmarks/check_kernels.py --device cpu --smoke
  step logprobs logprobs.jsonl 10 90 "$PY" benchmarks/bench_logprobs.py --smoke --device cpu --warmup 0 --repeats 1
  step train_lora train.jsonl 10 120 "$PY" benchmarks/bench_train.py --smoke --lora-r 4
  step train train.jsonl 10 120 "$PY" benchmarks/bench_train.py --smoke
  step generate_sampler generate.jsonl 10 60 "$PY" benchmarks/bench_generate.py --sampler --smoke
  step generate generate.jsonl 10 90 "$PY" benchmarks/bench_generate.py --smoke
  step cuda_tests cuda_tests.jsonl 10 120 "$PY" benchmarks/run_cuda_tests.py
  step pair_loss pair_loss.jsonl 10 60 "$PY" benchmarks/bench_pair_loss.py --smoke --device cpu --warmup 0 --repeats 1
else
  # 1. compiled kernels vs CPU references: odd shapes, offsets past 2**31 (and registers / spills)
  step kernels kernels.jsonl 60 150 "$PY" benchmarks/check_kernels.py --device cuda
  # 2. fused log-probs at the target shape with every baseline there is, then the 128k vocabulary
  step logprobs_32k logprobs.jsonl 60 130 "$PY" benchmarks/bench_logprobs.py --shapes 16384x4096x32000
  step logprobs_128k logprobs.jsonl 45 100 "$PY" benchmarks/bench_logprobs.py --shapes 16384x4096x128256
  # 3. the SPIN training step, minispin vs the naive recipe, with peak memory: 1B, then 7B
  step train_1b train.jsonl 60 100 "$PY" benchmarks/bench_train.py --shapes 1b --steps 3 --warmup 1
  step train_7b train.jsonl 90 150 "$PY" benchmarks/bench_train.py --shapes 7b --steps 2 --warmup 1
  # 3b. LoRA SPIN steps for one 24 GB card (peak vs the memory model's PREDICTIONS in RESULTS.md): bf16 frozen
  # base, fp32 r-16 adapters, max_length 1024 (prompt 512), micro-batch 1, activation checkpointing
  step train_lora train.jsonl 60 120 "$PY" benchmarks/bench_train.py --shapes 7b,llama3_8b,llama2_7b --lora-r 16 \
    --micro-batch 1 --accum 1 --prompt-len 512 --response-len 512 --steps 2 --warmup 1
  # 4. the sampler alone (candidate sets vs full sort; eager and CUDA graphs) at batch 64, vocab 32000; then
  #    sampler vs HF generate at batch 1 and 64: 8 of Mistral-7B's 32 layers (the output says "layers": 8)
  step generate_sampler generate.jsonl 30 60 "$PY" benchmarks/bench_generate.py --sampler
  step generate generate.jsonl 60 150 "$PY" benchmarks/bench_generate.py --batches 1,64 --layers 8 \
    --prompt-len 256 --new-tokens 128
  # 5. the CUDA tests (the kernel check itself ran in step 1)
  step cuda_tests cuda_tests.jsonl 45 120 "$PY" benchmarks/run_cuda_tests.py --skip-kernel-check
  # 6. the pair loss alone and the whole head step
  step pair_loss pair_loss.jsonl 30 60 "$PY" benchmarks/bench_pair_loss.py
  # extra: the autotuner's pick over the candidate configs, to compare with the fixed rule's minispin line
  step logprobs_autotuned logprobs.jsonl 40 60 env MINISPIN_AUTOTUNE=1 "$PY" benchmarks/bench_logprobs.py \
    --shapes 16384x4096x32000 --methods minispin
fi

# ---------------------------------------------------------------- one-page summary
{
  echo "# minispin GPU check ($( [ "$DRY" -eq 1 ] && echo 'DRY RUN on CPU: smoke sizes, numbers mean nothing' || echo 'full' ))"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(elapsed)s of a ${BUDGET}s budget; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "$VERSIONS"
  echo "- install: $INSTALL"
  echo "- liger wheel: $LIGER"
  echo "- trl wheel: $TRL"
  echo
  echo "| step | status | results |"
  echo "|---|---|---|"
  printf '%s\n' "${STEP_LINES[@]}"
  echo
  "$PY" benchmarks/summarize_gpu_check.py "$OUT_DIR" 2>>"$LOG"
} >"$SUMMARY"
cat "$SUMMARY"
