#!/usr/bin/env bash
# Quick start: the set-up (scripts/setup.sh), then IVON on real Fashion-MNIST (`vbpc train`, its
# packaged default config: an MLP, 2 epochs, about 20 s on 2 CPU cores) and the uncertainty report of
# the trained posterior (`vbpc evaluate`: BMA over 32 samples, metrics with 95% bootstrap intervals,
# the sklearn digits as OOD data, reliability/OOD/risk-coverage plots).  Re-running starts afresh.
#
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck disable=SC1091
source scripts/setup.sh

run=runs/fmnist_ivon            # run.out of the default config (vbpc/configs/fmnist_ivon.yaml)
report="$run/report"
vbpc train --overwrite
vbpc evaluate "$run/checkpoint.safetensors" --ood digits --out "$report"

echo
echo "venv:       $VIRTUAL_ENV   (source $VIRTUAL_ENV/bin/activate)"
echo "checkpoint: $PWD/$run/checkpoint.safetensors"
echo "report:     $PWD/$report/report.md  (and report.json and the plots in $PWD/$report/)"
