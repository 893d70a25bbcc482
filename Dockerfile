# syntax=docker/dockerfile:1.7
#
# SeLLa-Rec scoring service on CUDA.
#
#   docker build -t sellarec .
#   docker run --gpus all -p 8000:8000 \
#     -v "$PWD/runs/ml-1m/artifacts:/artifacts:ro" -v sellarec-models:/models \
#     -e SELLAREC_REDIS_URL=redis://redis:6379/0 sellarec
#
# The backbone cache (/models) and the artifact bundle (/artifacts) are volumes. To bake them
# into the image instead, pass them as named build contexts; they are copied when given and
# the image stays lean when not:
#
#   docker build --build-context artifacts=runs/ml-1m/artifacts \
#                --build-context models="$HOME/.cache/sellarec" -t sellarec:ml-1m .
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build and brings its own CUDA libraries; the base
# image supplies the matching runtime environment for the NVIDIA container toolkit
# (host driver >= 580).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG PYTHON_VERSION=3.11
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.26

# Empty defaults for the optional baked-in directories; --build-context NAME=DIR replaces them.
FROM scratch AS artifacts
FROM scratch AS models

FROM ${UV_IMAGE} AS uv

# ---- build: a virtualenv with the package and its dependencies under /opt ----
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
# uv only provides the interpreter (Ubuntu 24.04 ships 3.12); the install itself is pip's.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject alone, so that code changes do not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p model training service loadtest \
 && touch model/__init__.py training/__init__.py service/__init__.py loadtest/__init__.py \
 && pip install . \
 && pip uninstall --yes sellarec
COPY model ./model
COPY training ./training
COPY service ./service
COPY loadtest ./loadtest
COPY bench ./bench
RUN pip install --no-deps . \
 && python -c "import service, model" \
 && command -v sellarec-serve sellarec-store

# ---- runtime ----
FROM ${CUDA_IMAGE}
ARG UID=10001
RUN groupadd --gid "${UID}" sellarec \
 && useradd --uid "${UID}" --gid "${UID}" --create-home --shell /usr/sbin/nologin sellarec \
 && mkdir -p /models /artifacts \
 && chown "${UID}:${UID}" /models /artifacts
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=artifacts --chown=${UID}:${UID} / /artifacts/
COPY --from=models --chown=${UID}:${UID} / /models/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface \
    SELLAREC_ARTIFACTS=/artifacts \
    SELLAREC_CACHE_DIR=/models \
    SELLAREC_HOST=0.0.0.0 \
    SELLAREC_PORT=8000 \
    SELLAREC_DEVICE=cuda

USER ${UID}:${UID}
WORKDIR /home/sellarec
VOLUME ["/models", "/artifacts"]
EXPOSE 8000

# /healthz answers once the process serves; allow model loading before failures count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SELLAREC_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["sellarec-serve"]
