# ime-recorder daemon image. The base is a build argument so CI can build from a local image.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY recorder ./recorder
COPY schemas ./schemas
COPY configs ./configs
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
COPY configs/recorder.toml /etc/ime-recorder/recorder.toml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IME_RECORDER_STORAGE__DATA_DIR=/data \
    IME_RECORDER_LOG__FORMAT=json
RUN useradd --system --uid 10001 --no-create-home recorder \
 && mkdir -p /data && chown recorder /data
USER recorder
VOLUME ["/data"]
STOPSIGNAL SIGTERM
CMD ["ime-recorder", "run", "--config", "/etc/ime-recorder/recorder.toml"]
