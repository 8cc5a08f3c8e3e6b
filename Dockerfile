# syntax=docker/dockerfile:1
# One image for every process of animate-queue: the Celery workers (the default command), beat,
# Flower, the metrics exporter (`animate-queue metrics`) and the DashScope emulator.
# docker-compose.yml picks the command per service; the README's Deploy section is the operator's guide.
#
# No secret is baked in: keys, passwords and credentials arrive at run time from the
# environment (compose's env_file: .env). .dockerignore keeps .env out of the build context.

# Minor version and Debian release pinned; patch releases of 3.11 come with a rebuild.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Celery's switch for containers: SIGTERM (docker stop, compose stop) starts the soft shutdown
# (worker_soft_shutdown_timeout = 30 s for running tasks), then requeues what is left, countdown
# messages included. Without it SIGTERM is a warm shutdown that waits for every running task
# however long (a copy may take COPY_TIME_LIMIT = 240 s), and the runtime SIGKILLs it first.
# Set image-wide so that Flower's "terminate task" sends the signal pool processes obey.
ENV REMAP_SIGTERM=SIGQUIT

# Flower's persistent state, on the writable /data directory (see below).
ENV FLOWER_DB=/data/flower.db

# A fixed non-root user; /data is its writable directory for Flower's database and beat's
# schedule file. A named volume mounted there starts as a copy of this directory, owner included.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app \
    && mkdir /data \
    && chown app:app /data

WORKDIR /app

# Only what the package needs to install (pyproject.toml names README.md as its readme).
# The sources stay in /app, read-only for the app user: Flower's --conf=config/flowerconfig.py is
# a path relative to this directory, and `animate-queue generate` can send the bundled samples in
# devstack/assets for a trial.
COPY pyproject.toml README.md ./
COPY config ./config
COPY workers ./workers
COPY emulator ./emulator
COPY devstack ./devstack

# The emulator extra (aiohttp; Pillow and PyAV are runtime dependencies anyway) so this same image
# runs the `emulator` compose profile for trials without real keys. Every dependency ships
# manylinux wheels (PyAV bundles FFmpeg), so no compiler or system library is needed.
RUN pip install --no-cache-dir ".[emulator]"

# Numeric, so that runtimes enforcing "run as non-root" (Kubernetes runAsNonRoot) can verify it.
USER 10001:10001

# The worker on every queue; compose runs one worker for `celery,dashscope` and one for `transfer`.
# No HEALTHCHECK here: each process has its own check, defined per service in docker-compose.yml.
CMD ["celery", "-A", "config.celery_app", "worker", "-Q", "celery,dashscope,transfer", "-E", "--loglevel=INFO"]
