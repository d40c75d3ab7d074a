# gpu-orchestrator: one image for every role (api, worker, scheduler, monitor, rq-dashboard).
# The monitor talks to the NVIDIA driver through NVML; the NVIDIA container toolkit mounts
# libnvidia-ml.so into the container when it runs with `gpus: all`, so no CUDA base is needed.
# The image needs a Redis at REDIS_URL: it carries no embedded server (the `embedded` extra).
FROM python:3.12-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md constraints.txt ./
COPY app ./app
COPY workers ./workers
# The exact versions CI tested (constraints.txt); no extras.
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus_multiproc \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    GPU_ORCH__SERVER__HOST=0.0.0.0
# The working folder belongs to the app user: anything a role writes relative to it (the
# default redis.data_dir ./var/redis, scratch files) must not need root.
RUN useradd --system --uid 10001 --user-group --home-dir /srv gpuo \
    && mkdir -p /srv && chown gpuo:gpuo /srv && chmod 0750 /srv
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
WORKDIR /srv
USER gpuo
EXPOSE 8086
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8086'), timeout=2)" || exit 1
ENTRYPOINT ["gpu-orchestrator"]
CMD ["api"]
