#!/usr/bin/env bash
# The main job on a fresh machine: install encoder-train into .venv, then run the quickstart demo.
# Extra arguments go to `encoder-train demo` (e.g. --workdir, --max_steps).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The CPU build of PyTorch (a plain `pip install torch` pulls a multi-GB CUDA build). On a GPU machine,
# install the CUDA build you want into .venv first: any torch>=2.4 that is already there is kept.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
# The eval extra (sentence-transformers): the demo's last stage scores the model on the offline evaluation suite.
.venv/bin/pip install -q -e '.[eval]'
exec .venv/bin/encoder-train demo "$@"
