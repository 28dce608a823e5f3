# The vodq image: one image for every role. The command picks the role:
# "vodq serve" (the default) runs the API and the scheduler in one process,
# "vodq api" and "vodq worker" run them apart (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# yt-dlp uses ffmpeg to merge separate audio and video streams and to fix up
# some containers. vodq downloads HLS with yt-dlp's native downloader.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && rm -rf /app/src

# A fixed UID, so that files on a bind mount or an NFS share can be given to it.
RUN groupadd --system --gid 10001 vodq \
    && useradd --system --uid 10001 --gid vodq --home-dir /data \
        --shell /usr/sbin/nologin vodq \
    && mkdir -p /data \
    && chown vodq:vodq /data

# Docker copies /data's owner into a new named volume, so vodq can write to it.
ENV DATA_DIR=/data
VOLUME /data
USER vodq
EXPOSE 8080

# The exec form makes vodq PID 1, so SIGTERM reaches it directly. On SIGTERM
# vodq stops its downloads within 10 s and keeps the partial files for resume.
STOPSIGNAL SIGTERM
CMD ["vodq", "serve"]
