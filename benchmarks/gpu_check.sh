#!/usr/bin/env bash
# The GPU run in one script, about 10 minutes on one CUDA machine (docs/configs.md, "What a run costs"):
#   1. the tests that need CUDA (tests/test_cuda.py: a seed's image on GPU vs CPU, bf16 autocast sampling,
#      bf16-mixed training, torch.compile, channels_last, DDP on every GPU present);
#   2. the CIFAR-10 recipe's training step (35.7M U-Net, batch 128, bf16-mixed) under Lightning against
#      the plain PyTorch loop, with peak GPU memory (benchmarks/train_throughput.py);
#   3. sampling throughput against diffusers' DDIMPipeline on google/ddpm-cifar10-32's UNet (--size cifar,
#      batch 256, 20 DDIM steps), fp32 and bf16 autocast, with peak memory (benchmarks/sampling_throughput.py).
# Each step writes benchmarks/results/gpu_<step>.txt (the results files open with command, commit and
# machine), and gpu_check.txt lists the steps with their exit codes and seconds.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine; needs pip install -e ".[dev,diffusers]"
#   bash benchmarks/gpu_check.sh --dry-run       # anywhere: prints the plan, then runs it on the CPU at tiny
#                                                # sizes into a temporary folder (or --out DIR)
# PYTHON (default: python) is the interpreter. A step that fails is recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=0
OUT=
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) [[ $# -ge 2 ]] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
    -h | --help) sed -n '2,17p' "$0" | cut -c3-; exit 0 ;;
    *) echo "error: unknown option $1 (options: --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if ((DRY)); then
  OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
  # the same scripts and options, shrunk to seconds on a CPU
  TESTS=(-m pytest -q tests/test_cuda.py)
  TRAIN=(benchmarks/train_throughput.py --config quickstart --batch-size 2 --interleave run --steps 1 --warmup 1 --rounds 2)
  SAMPLE=(benchmarks/sampling_throughput.py --size tiny --n 1 --steps 2 --rounds 2)
  SAMPLE_BF16=("${SAMPLE[@]}" --autocast bf16)
else
  OUT=${OUT:-benchmarks/results}
  if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device visible to $PYTHON: this script measures a GPU (for the CPU rehearsal: --dry-run)" >&2
    exit 1
  fi
  TESTS=(-m pytest -q -rs tests/test_cuda.py)
  TRAIN=(benchmarks/train_throughput.py --config cifar --precision bf16-mixed --interleave run --steps 20 --warmup 5 --rounds 10)
  SAMPLE=(benchmarks/sampling_throughput.py --size cifar --n 256 --steps 20 --rounds 10)
  SAMPLE_BF16=(benchmarks/sampling_throughput.py --size cifar --n 256 --steps 20 --rounds 5 --autocast bf16)
fi
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  echo "error: the sampling steps compare with diffusers: pip install -e \".[dev,diffusers]\"" >&2
  exit 1
fi
mkdir -p "$OUT"

# name, step time limit (s), interpreter arguments; the four limits add up to 10 minutes
PLAN=("tests 150 ${TESTS[*]}"
      "train_throughput 150 ${TRAIN[*]} --out $OUT/gpu_train_throughput.txt"
      "sampling_throughput 180 ${SAMPLE[*]} --out $OUT/gpu_sampling_throughput.txt"
      "sampling_throughput_bf16 120 ${SAMPLE_BF16[*]} --out $OUT/gpu_sampling_throughput_bf16.txt")
echo "gpu_check plan ($( ((DRY)) && echo "dry run on the CPU, tiny sizes" || echo GPU)), results in $OUT:"
for step in "${PLAN[@]}"; do
  read -r name limit args <<<"$step"
  echo "  $name ($( ((DRY)) && echo "on a GPU " )<= ${limit} s): $PYTHON $args"
done

SUMMARY=$OUT/gpu_check.txt
{
  echo "command: bash benchmarks/gpu_check.sh $( ((DRY)) && echo --dry-run)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
} >"$SUMMARY"
failed=0
for step in "${PLAN[@]}"; do
  read -r name limit args <<<"$step"
  echo "== $name"
  start=$SECONDS
  ((DRY)) && limit=0  # no limit on a CPU rehearsal: its speed says nothing
  # shellcheck disable=SC2086  # the arguments are words without spaces
  if [[ $name == tests ]]; then
    timeout "$limit" "$PYTHON" $args 2>&1 | tee "$OUT/gpu_tests.txt"
  else
    timeout "$limit" "$PYTHON" $args
  fi
  code=${PIPESTATUS[0]}
  ((code == 0)) || failed=1
  echo "$name: exit $code$( ((code == 124)) && echo " (over its ${limit} s)"), $((SECONDS - start)) s" | tee -a "$SUMMARY"
done
echo "wrote $SUMMARY and the gpu_*.txt beside it"
exit $failed
