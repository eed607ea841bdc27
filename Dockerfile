# ime-recorder daemon image. The base is a build argument so CI can build from a local image
# (any Debian-like image with python3 >= 3.11 and its venv module will do).
ARG BASE_IMAGE=python:3.12-slim

# ---- build: a virtualenv with the recorder and its dependencies (pip and the build backend
# stay here; every dependency is a binary wheel, so no compiler is needed either)
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY recorder ./recorder
COPY schemas ./schemas
COPY configs ./configs
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall --yes pip \
 && /opt/venv/bin/ime-recorder --version

# ---- runtime: the virtualenv, an example config and an unprivileged user
FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
COPY configs/recorder.toml /etc/ime-recorder/recorder.toml
# Every config key can be overridden as IME_RECORDER_<SECTION>__<KEY>; credentials come from
# HEDGETECH_USERNAME / HEDGETECH_PASSWORD / HEDGETECH_TOKEN or their *_FILE (Docker secrets).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IME_RECORDER_STORAGE__DATA_DIR=/data \
    IME_RECORDER_LOG__FORMAT=json \
    IME_RECORDER_METRICS__HOST=0.0.0.0 \
    IME_RECORDER_METRICS__PORT=9108
RUN groupadd --system --gid 10001 recorder \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin recorder \
 && mkdir -p /data \
 && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9108
# SIGTERM: close the streams (feed.close_timeout_seconds), flush, exit 0: well within the
# 10 s that `docker stop` waits. A second SIGTERM exits at once.
STOPSIGNAL SIGTERM
# /healthz answers while the event loop does; python, since slim images carry no curl
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
  CMD ["python3", "-m", "recorder.healthcheck", "--config", "/etc/ime-recorder/recorder.toml"]
CMD ["ime-recorder", "run", "--config", "/etc/ime-recorder/recorder.toml"]
