# specrec/target: NVIDIA Triton serving specrec_target, started by specrec-target. The tritonserver binary and its
# Python backend come with the nvidia-pytriton wheel (Triton 2.51 = NGC 24.10) inside specrec/base, so model.py
# runs in the same interpreter and torch as everything else, with no conda-packed environment to unpack at start.
# specrec-target assembles the Python backend, waits for READY, forwards SIGTERM and watches the stubs: a dead stub
# ends the process and the kubelet restarts the container (Triton itself would stay READY and fail every request).
ARG SPECREC_BASE=specrec/base:0.1.0
FROM ${SPECREC_BASE}
COPY build/artifacts/ /opt/specrec/artifacts/
# HTTP (health), gRPC (KServe v2), Prometheus metrics.
EXPOSE 8000 8001 8002
CMD ["specrec-target"]
