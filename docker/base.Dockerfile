# specrec/base: Python 3.11, torch and specrec with every runtime dependency, in /opt/venv. The three service
# images (orchestrator, draft, target) start FROM it and add only the trained artifacts and their command.
#
# Build with `make images` (harness/containers.py), which first stages, from the repository root:
#   build/wheels     specrec and all its dependencies as wheels (`pip wheel torch==2.13.0 .`), resolved once on
#                    the build machine, so this build needs no network and every image gets the same versions;
#   BASE_IMAGE       python:3.11-slim-bookworm by default; where no registry is reachable, a Debian bookworm
#                    base made with debootstrap (specrec-local/python:3.11-bookworm).
# GPU: the wheelhouse decides. torch==2.13.0 from PyPI is the CUDA build (it carries the CUDA runtime and runs on
# the node's driver through the NVIDIA container runtime); the CPU build comes from the CPU index.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
RUN python3 -m venv /opt/venv
COPY build/wheels /tmp/wheels
# --no-index: only the staged wheels, never a registry at build time. The stubs under specrec/v1 are generated
# from protos/ with the pinned grpcio-tools and committed; nothing is regenerated here.
RUN /opt/venv/bin/pip install --find-links /tmp/wheels torch==2.13.0 specrec && rm -rf /tmp/wheels
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp specrec
# HOME=/tmp: torch and friends write caches under $HOME; the root filesystem is read-only in the cluster.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SPECREC_ARTIFACTS=/opt/specrec/artifacts
USER 10001:10001
