# syntax=docker/dockerfile:1
# specrec draft service: DraftService.Speculate on a small GPU, a MIG slice or CPU. Build from the
# repository root, with the trained drafter and catalog staged under build/artifacts:
#   docker build -f docker/draft.Dockerfile -t specrec/draft:0.1.0 .
# The default torch wheel from PyPI bundles its CUDA libraries and falls back to CPU when no GPU
# is visible; for a smaller CPU-only image pass
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM python:3.11-slim-bookworm AS build
ARG TORCH_INDEX=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY specrec specrec
COPY draft_service draft_service
# Regenerate the gRPC stubs so the image never ships stubs older than its .proto files.
RUN pip install "grpcio-tools>=1.66" \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
      $(find protos -name '*.proto') \
 && pip install .

FROM python:3.11-slim-bookworm
ARG ARTIFACTS=build/artifacts
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp specrec
COPY --from=build /opt/venv /opt/venv
COPY ${ARTIFACTS}/ /opt/specrec/artifacts/
# HOME=/tmp: torch and friends write caches under $HOME; the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SPECREC_ARTIFACTS=/opt/specrec/artifacts
USER 10001:10001
# gRPC (DraftService), Prometheus metrics.
EXPOSE 50052 9101
CMD ["specrec-draft"]
