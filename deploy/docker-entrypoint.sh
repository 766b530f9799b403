#!/bin/sh
# The container's entry point: `keras-llm serve` with TF Serving's image
# conventions. The model MODEL_NAME is served from MODEL_BASE_PATH/MODEL_NAME
# (versions below it: /models/NAME/1/, /models/NAME/2/, ...), gRPC on
# GRPC_PORT (8500), HTTP on REST_API_PORT (8501), bound to KERAS_LLM_HOST
# (0.0.0.0: the server's own default is loopback, unreachable from outside a
# container). Arguments given to the container are appended: they add flags
# (--max_slots=8, --model_config_file=...) and, given twice, the later wins.
# `exec` makes the server PID 1, so it receives SIGTERM and drains.
set -eu
exec keras-llm serve \
    --host="${KERAS_LLM_HOST:-0.0.0.0}" \
    --port="${GRPC_PORT:-8500}" \
    --rest_api_port="${REST_API_PORT:-8501}" \
    --model_name="${MODEL_NAME:-model}" \
    --model_base_path="${MODEL_BASE_PATH:-/models}/${MODEL_NAME:-model}" \
    "$@"
