# vision-host in a container: `docker build -t vision-host .`, then see compose.yaml, or
#   docker run --rm -p 8080:8080 -v ./config:/config:ro vision-host run -f /config/compose-cameras.toml
# The image holds the host, the built processors (wasm/) and OpenCV's system libraries; the
# vision model runs elsewhere (Ollama, vLLM, … at ollama-url). `[serve]` is left out: torch
# and the models would add several GB (build FROM this image and `pip install "vision-host[serve]"`).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_DATA_HOME=/data

# OpenCV's shared libraries, and FFmpeg for RTSP/HLS sources and H.264 files (versions: those of
# the Debian release the base image names, with its security updates)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY host ./host
COPY wasm ./wasm
COPY media ./media
# the project itself (its dependencies' ranges are in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install ".[record]"

# an unprivileged user; the history and the event outbox live in /data (a volume)
RUN useradd --create-home --uid 10001 vision \
    && mkdir -p /data \
    && chown vision /data
USER 10001
WORKDIR /home/vision
VOLUME ["/data"]
EXPOSE 8080

# /healthz answers while the process runs (the viewer's server, -o mjpeg on port 8080); the
# token, when the run has one, is read from the same environment variable the run reads.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8080/healthz', headers={'Authorization': 'Bearer ' + os.environ.get('VISION_HOST_TOKEN', '')}), timeout=4)"]

ENTRYPOINT ["vision-host"]
CMD ["run", "-f", "/config/run.toml"]
