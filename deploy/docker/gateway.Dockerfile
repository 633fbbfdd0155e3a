# Gateway image: the FastAPI OpenAI-compatible server. It needs no vLLM (no extra), only the project's base
# dependencies; torch comes from the CPU wheel index (the gateway never touches a GPU).
#   docker build -f deploy/docker/gateway.Dockerfile -t ghcr.io/expertmesh/expertmesh-gateway:0.1.0 .
# The install steps are the Makefile's `install` target (same post-install removal, same protos step), without
# the cpu/dev extras and the helm/kubectl tools.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=1 \
    VIRTUAL_ENV=/opt/expertmesh/.venv PATH=/opt/expertmesh/.venv/bin:$PATH
RUN useradd --create-home --uid 1000 expertmesh
WORKDIR /opt/expertmesh
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
RUN python -m venv .venv \
 && .venv/bin/python -m pip install -q --upgrade pip \
 && .venv/bin/python -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu -e . \
 && (.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true) \
 && .venv/bin/python -m expertmesh.core.protos \
 && chown -R expertmesh /opt/expertmesh
USER 1000
EXPOSE 8000
ENTRYPOINT ["python", "-m", "expertmesh.gateway.app"]
