# gpu-orchestrator: one image for every role (api, worker, scheduler, monitor, rq-dashboard).
# The monitor talks to the NVIDIA driver through NVML; the NVIDIA container toolkit mounts
# libnvidia-ml.so into the container when it runs with `gpus: all`, so no CUDA base is needed.
FROM python:3.12-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus_multiproc \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility
RUN useradd --system --uid 10001 --home-dir /srv gpuo
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /srv
USER gpuo
EXPOSE 8086
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8086'), timeout=2)" || exit 1
ENTRYPOINT ["gpu-orchestrator"]
CMD ["api"]
