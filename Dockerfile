# syntax=docker/dockerfile:1
# One image for every ladder process (docs/deployment.md):
#   ladder serve    the API (default command)      ladder worker   a Celery worker (one per GPU, or on CPU)
#   ladder migrate  the Alembic migrations          ladder keys create --tenant NAME
#
# No CUDA base image: torch 2.14.1 and torchvision 0.29.1 from PyPI are CUDA 13.0 builds (cu130) that
# bring their own CUDA libraries (the nvidia-* wheels) and also run on CPU. A GPU host needs only the
# NVIDIA driver, R580 or newer, a Turing-or-newer GPU (compute capability 7.5+) and the NVIDIA
# Container Toolkit; `ladder worker` with LADDER_DEVICE=cuda checks them at start and refuses otherwise.
#
# Build: docker build -t ladder .   (BuildKit, the default builder since Docker 23, for the cache mounts)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# bubblewrap: the sandbox the custom-model (.pt2) checks run in, unprivileged (user namespaces; the
# api and worker services in docker-compose.yml relax Docker's seccomp/AppArmor defaults for it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user; /app is its working directory (LADDER_DATA_DIR, `ladder-data`, resolves
# under it, but only the embedded default writes there).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ladder \
    && mkdir -p /app \
    && chown ladder:ladder /app

# Dependencies first: this layer (several GB, torch and its CUDA wheels) is rebuilt only when
# requirements.lock changes, not on every source edit. The lock pins every package, transitive ones
# included, resolved from the runtime requirements.txt (its header says how to regenerate it after
# a change there): --no-deps installs exactly it, and pip check fails the build if it is not
# self-consistent. Test tools (requirements-dev.txt: pytest, moto, schemathesis, playwright) stay out.
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps -r /tmp/requirements.lock \
    && pip check \
    && rm /tmp/requirements.lock

# Then the package itself (dependencies are already in place; pip check fails the build if
# pyproject.toml asks for something the lock lacks). Only what pyproject.toml packages is copied,
# so edits to tests or docs do not invalidate this layer.
COPY pyproject.toml /tmp/ladder-src/
COPY services /tmp/ladder-src/services
COPY api /tmp/ladder-src/api
COPY workers /tmp/ladder-src/workers
COPY migrations /tmp/ladder-src/migrations
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /tmp/ladder-src \
    && pip check \
    && rm -rf /tmp/ladder-src

USER ladder
WORKDIR /app

# Listen on every interface inside the container (the setting's default is 127.0.0.1).
ENV LADDER_HOST=0.0.0.0
EXPOSE 8000

# No HEALTHCHECK in the image: the same image runs workers, which serve no HTTP, and a check on
# /healthz would mark every worker unhealthy (an orchestrator acting on it kills them mid-stage).
# docker-compose.yml gives the api its check on /healthz; with plain `docker run`, add one to the API
# container (`--health-cmd`, docs/deployment.md) and none to workers.

CMD ["ladder", "serve"]
