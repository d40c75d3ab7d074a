"""Background roles of gpu-orchestrator: RQ workers, the periodic scheduler, the GPU monitor.

Nothing here connects to Redis or reads config on import; each role's ``run(settings)`` builds
what it needs explicitly.

- :mod:`workers.webhooks`: the delivery job (signing, SSRF policy, retries).
- :mod:`workers.worker`: ``gpu-orchestrator worker``.
- :mod:`workers.scheduler`: ``gpu-orchestrator scheduler`` (safety-net pass, reaper).
- :mod:`workers.monitor`: ``gpu-orchestrator monitor`` with the NVML and simulated backends.
- :mod:`workers.rq_overrides`: the RQ behaviours we correct, each naming what it fixes.

What the API shares with these roles lives under ``app/`` (``app.queues``, ``app.outbox``,
``app.dashboard``); nothing here imports ``app.cli`` (tests/test_imports.py).
"""
