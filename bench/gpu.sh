#!/usr/bin/env bash
# The benchmark on a lent CUDA machine (see bench/README.md). Its image has torch but not trl, datasets,
# pydantic or bitsandbytes: they travel as wheels in .whl-bench/ (ignored via .git/info/exclude) and are
# installed into /tmp/site. Usage there: bash bench/gpu.sh "<run.py arguments>" ...
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-bench/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" || exit 1
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "no bitsandbytes"
for args in "$@"; do
  echo "=== bench/run.py --device cuda $args"
  python3 bench/run.py --device cuda $args 2>&1 | grep -v -i "warn" | tee -a "${OUT:-/tmp}/gpu.log"
done
cp bench/results/*-cuda.json "${OUT:-/tmp}/" 2>/dev/null
exit 0
