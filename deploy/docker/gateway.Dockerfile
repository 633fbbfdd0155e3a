# Gateway image: the front door (API keys, /health, /metrics, /experts, a streaming proxy of /v1/* to the routers:
# `--router http://ROUTER:8001`). It needs no vLLM (no extra), only the project's base dependencies; torch comes
# from the CPU wheel index (the gateway never touches a GPU).
#   docker build -f deploy/docker/gateway.Dockerfile -t ghcr.io/expertmesh/expertmesh-gateway:0.1.0 .
# The install steps are the Makefile's `install` target (same post-install removal), but not editable (the
# image needs no source tree), without the cpu/dev extras and the helm/kubectl tools. The build (setup.py's hook)
# generates the gRPC modules and packs the demo model (models/demo) into the package.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=1 \
    VIRTUAL_ENV=/opt/expertmesh/.venv PATH=/opt/expertmesh/.venv/bin:$PATH
RUN useradd --create-home --uid 1000 expertmesh
WORKDIR /opt/expertmesh
# Sources only for the build (/tmp/src, removed after): the installed package is all the image needs.
COPY pyproject.toml setup.py README.md /tmp/src/
COPY protos /tmp/src/protos
COPY services /tmp/src/services
COPY models/demo /tmp/src/models/demo
RUN python -m venv .venv \
 && .venv/bin/python -m pip install -q --upgrade pip \
 && cd /tmp/src \
 && /opt/expertmesh/.venv/bin/python -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu . \
 && cd /opt/expertmesh && rm -rf /tmp/src \
 && (.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true) \
 && chown -R expertmesh /opt/expertmesh
USER 1000
EXPOSE 8000
ENTRYPOINT ["python", "-m", "expertmesh.gateway.app"]
