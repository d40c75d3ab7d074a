"""Background roles of gpu-orchestrator: RQ workers, the periodic scheduler, the GPU monitor.

Nothing here connects to Redis or reads config on import; each role's ``run(settings)`` builds
what it needs explicitly.

- :mod:`workers.queues`: the RQ queues and the JSON serializer every role shares.
- :mod:`workers.outbox`: turns the engine's webhook outbox into RQ jobs (crash-safe).
- :mod:`workers.webhooks`: the delivery job (signing, SSRF policy, retries).
- :mod:`workers.worker`: ``gpu-orchestrator worker``.
- :mod:`workers.scheduler`: ``gpu-orchestrator scheduler`` (safety-net pass, reaper).
- :mod:`workers.monitor`: ``gpu-orchestrator monitor`` with the NVML and simulated backends.
- :mod:`workers.dashboard`: rq-dashboard mounted under the API at ``/rq``.
"""
