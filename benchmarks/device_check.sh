#!/usr/bin/env bash
# One prepared device check for a machine with one CUDA GPU (about 8 minutes; --quick: about 2):
#   1. pytest -m cuda  (extraction, clipping, the wrapper in a training loop, every method's
#      promise; float32 and bf16 autocast)
#   2. benchmarks/methods.py on CUDA: ResNet18 and DLA at CIFAR shape, batch 128, every
#      method's plain and amortised step as a ratio to orig (clip step included)
#   3. benchmarks/spectral.py on CUDA: block Lanczos vs the published PowerQR vs the
#      circular Gram bound vs svds on the host
# and writes benchmarks/results/gpu.md. On a machine without CUDA it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device_check: no CUDA device on this machine; nothing to check (exit 0)"
    exit 0
fi
OUT=benchmarks/results/gpu.md
TMP=$(mktemp -d)
if [ $QUICK = 1 ]; then STEPS=12; MODES="wBN"; SHAPES=0,1,4,7; MAXIT=200; else STEPS=60; MODES="wBN noBN"; SHAPES=all; MAXIT=600; fi
{
  echo "# Device check ($( [ $QUICK = 1 ] && echo quick || echo full ))"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
  echo
  echo "## pytest -m cuda"
  echo
  echo '```'
} > "$OUT"
"$PY" -m pytest -q -m cuda tests/library/test_cuda.py tests/library/test_spectral.py 2>&1 | tail -15 | tee -a "$OUT" || true
echo '```' >> "$OUT"
for MODEL in ResNet18 DLA; do
  "$PY" benchmarks/methods.py --device cuda --model "$MODEL" --modes $MODES --train-steps $STEPS --full-period \
      --batch-size 128 --out "$TMP/methods_$MODEL.md" || echo "methods benchmark $MODEL failed" >> "$OUT"
  { echo; echo "## Methods benchmark, $MODEL"; echo; [ -f "$TMP/methods_$MODEL.md" ] && sed '1,/^## Run/{/^## Run/!d}' "$TMP/methods_$MODEL.md"; } >> "$OUT"
done
"$PY" benchmarks/spectral.py --device cuda --shapes $SHAPES --max-iter $MAXIT --out "$TMP/spectral.md" \
    || echo "spectral benchmark failed" >> "$OUT"
{ echo; echo "## Spectral benchmark"; echo; [ -f "$TMP/spectral.md" ] && sed 1d "$TMP/spectral.md"; } >> "$OUT"
echo "device_check: wrote $OUT"
