# keras-llm serve: TF Serving's gRPC and REST APIs plus the OpenAI API over a
# `keras-llm export` directory, in TF Serving's image layout.
#
#   docker build -t keras-llm:0.1.0 .
#   docker run -p 8500:8500 -p 8501:8501 -e MODEL_NAME=smollm2 \
#       -v /srv/models/smollm2:/models/smollm2:ro keras-llm:0.1.0 --max_slots=8
#
# The export is mounted (or copied in a derived image) at
# /models/$MODEL_NAME/<version>/; arguments after the image name are more
# `keras-llm serve` flags (deploy/docker-entrypoint.sh). deploy/ holds the
# Kubernetes and KServe manifests; tests/test_deploy.py checks them against
# this file and the server.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    HOME=/home/keras-llm \
    MODEL_NAME=model \
    MODEL_BASE_PATH=/models \
    GRPC_PORT=8500 \
    REST_API_PORT=8501 \
    KERAS_LLM_HOST=0.0.0.0

WORKDIR /opt/keras-llm
# The pinned dependencies first: this layer is rebuilt only when they change.
COPY requirements.txt ./
RUN pip install -r requirements.txt
# The package without its dependencies, as README installs it (a regular,
# not an editable, install: the sources are removed afterwards).
COPY pyproject.toml README.md ./
COPY keras_llm ./keras_llm
COPY export ./export
COPY serving ./serving
RUN pip install --no-deps . \
    && cd / && rm -rf /opt/keras-llm
WORKDIR /

COPY deploy/docker-entrypoint.sh /usr/local/bin/keras-llm-entrypoint
# A numeric user, so Kubernetes' runAsNonRoot can check it. Its home holds the
# XLA compilation cache ($HOME/.cache/keras_llm); /models is read-only.
RUN chmod 0755 /usr/local/bin/keras-llm-entrypoint \
    && groupadd --system --gid 10001 keras-llm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/keras-llm --create-home \
        --shell /usr/sbin/nologin keras-llm \
    && mkdir -p /models
USER 10001:10001
WORKDIR /home/keras-llm

EXPOSE 8500 8501
# /health answers 200 once a model serves, 503 while loading or draining
# (slim images have no curl; urlopen raises on a 503).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('REST_API_PORT', '8501') + '/health', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/keras-llm-entrypoint"]
CMD []
