# syntax=docker/dockerfile:1
# specrec orchestrator: the client-facing gRPC API (CPU only). Build from the repository root,
# with the trained artifacts (catalog, semantic IDs, tries) staged under build/artifacts:
#   docker build -f docker/orchestrator.Dockerfile -t specrec/orchestrator:0.1.0 .

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch first: the orchestrator runs no model, and the default Linux wheel pulls in CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY specrec specrec
COPY orchestrator orchestrator
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
# HOME=/tmp: the root filesystem is read-only in the cluster and /tmp is an emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SPECREC_ARTIFACTS=/opt/specrec/artifacts
USER 10001:10001
# gRPC API, Prometheus metrics.
EXPOSE 50051 9100
CMD ["specrec-orchestrator"]
