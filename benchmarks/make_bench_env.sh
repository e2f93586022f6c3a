#!/usr/bin/env bash
# Create .venv-bench: a benchmark-only environment with chatforge and its peers (TRL), kept apart
# from the test environment .venv so that TRL's requirements never change what the tests run on.
#
#   bash benchmarks/make_bench_env.sh            # then: .venv-bench/bin/python benchmarks/<name>_speed.py
#
# trl 1.12 needs transformers>=4.56.2, accelerate>=1.4.0, datasets>=4.7.0 (chatforge's own pins allow
# transformers 5.x, which it keeps). torch is reused from the system/.venv when importable, as `make` does.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bench}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install -e ".[dev]" "trl==1.12.*" "accelerate>=1.4" "datasets>=4.7" psutil requests  # requests: trl.GRPOTrainer imports it
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
print(f"bench env ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
