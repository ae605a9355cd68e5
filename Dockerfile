# syntax=docker/dockerfile:1
# CPU images of smartmixed, two targets from one build context:
#   serve     ONNX Runtime and the web stack only (no torch), non-root, HEALTHCHECK on readiness
#   pipeline  train + export + bench (adds the `train` extra: torch and friends)
# docker build --target serve -t smartmixed-serve .
# docker build --target pipeline --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> -t smartmixed-pipeline .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin smartmixed \
 && mkdir -p /data/runs /data/models \
 && chown -R smartmixed:smartmixed /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY train/ train/
COPY export/ export/
COPY serve/ serve/
COPY bench/ bench/

FROM base AS serve
RUN pip install .
USER smartmixed
ENV SMARTMIXED_HOST=0.0.0.0 \
    SMARTMIXED_PORT=8000 \
    SMARTMIXED_REPOSITORY=/data/models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/v2/health/ready' % os.environ.get('SMARTMIXED_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]
CMD ["smartmixed-serve"]

FROM base AS pipeline
# PyPI's default Linux torch wheel is the CUDA build (several GB, works on CPU too); pass the
# PyTorch CPU wheel index as TORCH_INDEX_URL to get the small CPU build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi \
 && pip install ".[train]"
USER smartmixed
ENV MPLCONFIGDIR=/tmp/matplotlib
CMD ["smartmixed-train", "--help"]
