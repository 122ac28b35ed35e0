#!/usr/bin/env bash
# From the Speaches configuration guide ("preload models at startup"), reconstructed; only the
# host changes (BASE_URL). POST /v1/models/{model_id} loads a model and answers once it is loaded.
set -euo pipefail
BASE_URL="${BASE_URL:-http://localhost:8000}"
MODELS=("$@")
if [ ${#MODELS[@]} -eq 0 ]; then
  MODELS=("Systran/faster-whisper-small" "speaches-ai/Kokoro-82M-v1.0-ONNX")
fi

# Wait for the server
until curl -sf "$BASE_URL/health" > /dev/null; do
  echo "Waiting for server..."
  sleep 2
done

for model in "${MODELS[@]}"; do
  echo "Preloading $model"
  curl -sf -X POST "$BASE_URL/v1/models/$model" > /dev/null
done
echo "All models preloaded"
