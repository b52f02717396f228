"""The BentoML services, from the repository root (or a Bento's src/):

    bentoml serve service.bento:FinetuneServe   API + trainer in one server (`make run`)
    bentoml serve service.bento:Api              the API alone (Kubernetes: many replicas, CPU)
    bentoml serve service.bento:Trainer          a trainer alone (Kubernetes: one per GPU pod)

The API (service.app, a FastAPI app mounted at /) serves /predict and queues jobs; a trainer asks
for a GPU and runs one job at a time in a child process (service.runner); without a GPU BentoML
warns and it trains on the CPU, niced and with half the cores. They share only the job store
(service.jobs: SQLite in FINETUNE_SERVE_HOME, or PostgreSQL) and the folder FINETUNE_SERVE_HOME
(registry, datasets, runs). A trainer finds queued jobs by polling the store; waking it when a job
is queued only saves the wait: FinetuneServe calls its own trainer, Api calls the trainer at
FINETUNE_SERVE_TRAINER_URL if one is set. So an API keeps serving and queuing with no trainer up,
and a restarting trainer loses nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import bentoml
import httpx

from . import datasets
from .app import app
from .batching import Batcher
from .context import Context
from .draining import Draining, drain_on_sigterm
from .exposure import check_exposure
from .guard import Guard
from .jobs import open_store
from .metrics import make_metrics
from .predictors import Predictors
from .runner import Runner
from .settings import settings
from .shedding import Shedding
from .timeouts import install as install_timeouts

log = logging.getLogger("service.bento")

# How often a worker checks that the server that started it is still there.
ORPHAN_CHECK_SECONDS = 2.0
# How long the API waits for a trainer's /wake; the job is stored either way.
WAKE_TIMEOUT_SECONDS = 2.0
# No OpenTelemetry span for predictions. BentoML records a span for every request even with tracing off
# (its sampler records what it does not export), and each span is a reference cycle that outlives its
# request into the collector's oldest generation: at 32 clients 2,400 spans piled up in 8 s and full
# collections of 40-160 ms ran every ~0.75 s, holding the GIL. Without them (bench/serve_bench.py, 32
# clients, int8 MiniLM, 2 cores): 280-320 -> 360-455 req/s, p99 216-486 -> 113-170 ms. Operators who
# export traces can set services.finetune-serve.tracing.excluded_urls to [] in the BentoML config.
UNTRACED = {"excluded_urls": ["^[a-z]+://[^/]+/predict$", "^[a-z]+://[^/]+/v2/models/[^/]+(/versions/[^/]+)?/infer$"]}

# traffic.timeout without BentoML's per-request timer that outlives the request (service.timeouts).
install_timeouts()


def exit_when_orphaned(what: str) -> None:
    """BentoML starts each worker in its own session, so a SIGKILLed server leaves them running.

    An orphaned trainer would keep claiming jobs next to the restarted server's trainer (and an
    orphaned API worker would keep its socket), so a worker exits once its parent is gone; the
    trainer's training child dies with it (PR_SET_PDEATHSIG) and its job resumes at the next start.
    In a container the parent is `bentoml serve`, in the same container: the watch fires only when
    that server is gone, and the pod is then restarted anyway.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_SECONDS)
        log.error("%s: the server process %d is gone; exiting", what, parent)
        os._exit(3)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def trainer_name() -> str:
    """This trainer's name in the job store: the setting, else the host name (in Kubernetes the pod's name)."""
    return settings().trainer_name or socket.gethostname()


@bentoml.service(name="finetune-trainer", resources={"gpu": settings().trainer_devices}, workers=1,
                 traffic={"timeout": 30})
class Trainer:
    def __init__(self) -> None:
        exit_when_orphaned("trainer")
        self.store = open_store()
        self.metrics = make_metrics()
        self.runner = Runner(self.store, worker=trainer_name(), lease_seconds=settings().job_lease_seconds,
                             on_tick=self._tick, on_finished=self._finished)
        self.runner.start()

    @bentoml.api
    def wake(self) -> dict:
        """A job was queued: start it now rather than at the next poll."""
        self.runner.wake()
        return {"running": self.runner.current.id if self.runner.current else None}

    @bentoml.api
    def status(self) -> dict:
        return {"running": self.runner.current.id if self.runner.current else None, "worker": self.runner.worker,
                "devices": settings().trainer_devices, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "alive": self.runner.alive()}

    def __is_ready__(self) -> bool:
        return self.runner.alive()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runner.stop()

    def _finished(self, job) -> None:
        self.metrics.job_duration.labels(outcome=job.status).observe(job.finished_at - (job.started_at or job.created_at))

    def _tick(self) -> None:
        self.metrics.set_jobs(self.store.counts())
        job = self.runner.current
        live = ((self.store.get(job.id).metrics or {}).get("train") or {}) if job else {}
        self.metrics.training_loss.set(live.get("loss") or 0.0)
        self.metrics.training_samples_per_second.set(live.get("samples_per_second") or 0.0)


def serve_api(wake_trainer) -> None:
    """What every API worker holds, whichever service runs it: the store, predictors, metrics, batcher."""
    exit_when_orphaned("api")
    drain_on_sigterm()  # SIGTERM: refuse new connections, finish open ones, then stop (service.draining)
    datasets.remove_stale_partials()  # a killed upload's temporaries; each upload sweeps again
    metrics = make_metrics()
    app.state.context = Context(
        store=open_store(),
        predictors=Predictors(on_load=metrics.model_load.observe, on_failure=metrics.load_failed),
        metrics=metrics,
        batcher=Batcher(settings().max_batch, settings().max_wait_ms / 1000, on_batch=metrics.inference_batch.observe),
        wake_trainer=wake_trainer,
    )


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="finetune-serve", workers=settings().api_workers, traffic={"timeout": 300}, tracing=UNTRACED)
class FinetuneServe:
    """The API with its own trainer: one server on one machine (`make run`)."""

    trainer = bentoml.depends(Trainer)

    @bentoml.on_deployment
    def refuse_open_network() -> None:  # in `bentoml serve` itself, before any worker: no key on 0.0.0.0 stops here
        check_exposure()

    def __init__(self) -> None:
        serve_api(self._wake_trainer)

    async def _wake_trainer(self) -> None:
        try:
            await self.trainer.to_async.wake()
        except Exception as err:  # the job is stored; the trainer's poll finds it
            log.warning("could not wake the trainer (%s); it will pick the job up on its next poll", err)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="finetune-api", workers=settings().api_workers, traffic={"timeout": 300}, tracing=UNTRACED)
class Api:
    """The API alone, for as many replicas as the traffic needs; trainers run elsewhere and poll the store."""

    @bentoml.on_deployment
    def refuse_open_network() -> None:
        check_exposure()

    def __init__(self) -> None:
        serve_api(self._wake_trainer)

    async def _wake_trainer(self) -> None:
        url = settings().trainer_url
        if url is None:
            return
        try:
            key = settings().api_key  # the trainers share the API's key
            headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if settings().has_api_key else {}
            async with httpx.AsyncClient(timeout=WAKE_TIMEOUT_SECONDS, headers=headers) as client:
                (await client.post(f"{url}/wake", json={})).raise_for_status()
        except httpx.HTTPError as err:  # the job is stored; a trainer's poll finds it
            log.warning("could not wake a trainer at %s (%s); one will pick the job up on its next poll", url, err)


# The key check and body limits wrap the whole server, BentoML's own routes included; a trainer's too
# (its /wake and /status), but for FinetuneServe's calls to its own trainer over BentoML's Unix socket.
FinetuneServe.add_asgi_middleware(Guard)
Api.add_asgi_middleware(Guard)
Trainer.add_asgi_middleware(Guard, trust_unix_socket=True)
# At most FINETUNE_SERVE_MAX_INFLIGHT prediction requests per worker; past a short wait, 429 (service.shedding).
FinetuneServe.add_asgi_middleware(Shedding)
Api.add_asgi_middleware(Shedding)
# On SIGTERM, responses say `Connection: close` while the worker drains (service.draining).
FinetuneServe.add_asgi_middleware(Draining)
Api.add_asgi_middleware(Draining)
