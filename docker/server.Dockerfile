# One image recipe for both servers and the load-test tools.
#   SERVER=torch_server EXTRAS=torch,gpu      (PyPI's torch 2.13.0 wheel is the CUDA build)
#   SERVER=tf_server    EXTRAS=tf-gpu,gpu     (tensorflow[and-cuda])
#   SERVER=loadtest     EXTRAS=loadtest
FROM python:3.11-slim-bookworm

ARG EXTRAS=torch,gpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 serving
WORKDIR /app

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY contract ./contract
COPY serving ./serving
COPY modelzoo ./modelzoo
COPY torch_server ./torch_server
COPY tf_server ./tf_server
COPY client ./client
COPY loadtest ./loadtest
# The project itself; its pyproject pins the versions that matter (torch, TF, grpcio, protobuf).
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]"

USER 10001
# Model repositories live on a volume; a server exports into it on first use.
VOLUME ["/models"]
EXPOSE 8001 8002
CMD ["python", "-m", "client", "--help"]
