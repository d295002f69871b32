# specrec/draft: DraftService.Speculate on a small GPU, a MIG slice or CPU (SPECREC_DEVICE). `make images` builds it
# on specrec/base with the trained drafter, retrieval pools and catalog staged under build/artifacts.
ARG SPECREC_BASE=specrec/base:0.1.0
FROM ${SPECREC_BASE}
COPY build/artifacts/ /opt/specrec/artifacts/
# gRPC (DraftService), Prometheus metrics.
EXPOSE 50052 9101
CMD ["specrec-draft"]
