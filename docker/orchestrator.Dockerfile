# specrec/orchestrator: the client-facing gRPC API (CPU only). `make images` builds it on specrec/base with the
# trained artifacts (catalog, semantic IDs, tries) staged under build/artifacts.
ARG SPECREC_BASE=specrec/base:0.1.0
FROM ${SPECREC_BASE}
COPY build/artifacts/ /opt/specrec/artifacts/
# gRPC API, Prometheus metrics.
EXPOSE 50051 9100
CMD ["specrec-orchestrator"]
