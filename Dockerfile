# quart_service in a container, with README.md's commands: `pip install -e .`, then
# `quart-service serve` (supervised Hypercorn workers; hypercorn.toml from this
# folder), bound to every interface instead of the file's loopback address.
#   docker build -t quart-service .
#   docker run --rm -p 8000:8000 -v qs-data:/var/lib/quart-service quart-service
# Several hosts (PostgreSQL, Redis): compose.yaml builds it with EXTRAS=postgres,redis.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    QUART_SERVICE_DATA_DIR=/var/lib/quart-service \
    QUART_SERVICE_LOG_FORMAT=json

WORKDIR /srv/quart-service
COPY . .
RUN pip install -e .
# Optional extras, e.g. --build-arg EXTRAS=postgres,redis
ARG EXTRAS=""
RUN if [ -n "$EXTRAS" ]; then pip install -e ".[$EXTRAS]"; fi

# Not root: the service writes only its data folder (SQLite file, leader lock,
# published snapshot, metric files).
RUN useradd --system --no-create-home quart \
    && mkdir -p "$QUART_SERVICE_DATA_DIR" \
    && chown quart "$QUART_SERVICE_DATA_DIR"
USER quart
VOLUME ["/var/lib/quart-service"]

EXPOSE 8000
# SIGTERM drains open streams for stream_drain_timeout (25 s): stop with -t 45.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]
CMD ["quart-service", "serve", "--bind", "0.0.0.0:8000"]
