# syntax=docker/dockerfile:1
# Triton model repository for model specrec_target, mounted at /models by the Helm chart (init
# container copy or image volume). Build from the repository root:
#   docker build -f docker/model-repository.Dockerfile \
#     --build-arg MODEL_REPOSITORY=<dir holding specrec_target/> -t specrec/model-repository:0.1.0 .
#
# NVIDIA's tritonserver:24.10-py3 image embeds Python 3.10 and no torch, while model.py needs
# specrec on Python 3.11. So the model brings its own interpreter: a conda-packed environment
# (EXECUTION_ENV_PATH) and the Python backend stub built for 3.11, which ships in the
# nvidia-pytriton 0.7.0 wheel (Triton 2.51 = 24.10). Both sit in the model directory, where the
# Python backend looks for them. Model weights are expected inside MODEL_REPOSITORY.

FROM continuumio/miniconda3:24.7.1-0 AS env
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
RUN conda create -y -p /env python=3.11 \
 && conda install -y -n base -c conda-forge conda-pack \
 && conda clean -afy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY specrec specrec
COPY target_service target_service
# torch from the CUDA index (its wheels carry the CUDA runtime); then specrec, which also brings
# nvidia-pytriton and with it the 3.11 stub.
RUN /env/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
 && /env/bin/pip install --no-cache-dir . \
 && cp /env/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub /stub \
 && conda-pack -p /env -o /python-env.tar.gz --ignore-missing-files

# busybox rather than scratch: the chart's init container copies the repository with `cp`.
FROM busybox:1.36
ARG MODEL_REPOSITORY=target_service/model_repository
COPY ${MODEL_REPOSITORY}/ /models/
COPY --from=env /python-env.tar.gz /models/specrec_target/python-env.tar.gz
COPY --from=env --chmod=0755 /stub /models/specrec_target/triton_python_backend_stub
# Point the Python backend at the packed environment unless config.pbtxt already does.
RUN cfg=/models/specrec_target/config.pbtxt \
 && test -f "$cfg" \
 && (grep -q EXECUTION_ENV_PATH "$cfg" || printf '\nparameters: {\n  key: "EXECUTION_ENV_PATH"\n  value: { string_value: "$$TRITON_MODEL_DIRECTORY/python-env.tar.gz" }\n}\n' >> "$cfg")
USER 1000:1000
