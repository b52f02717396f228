"""The FastAPI app BentoML mounts at / (service.bento): the routes of every resource and the error answers.

Each route decodes its request, makes one call into the core (or service.inference) and encodes the
answer; errors are JSON `{"error", "field"}` (service.errors). The API key and body limits wrap the
whole server (service.guard).
"""

from __future__ import annotations

from fastapi import FastAPI

from . import docs, errors, openapi
from .routes import admin, datasets, jobs, models, predict, v2

# docs_url and redoc_url off: FastAPI's pages load their scripts from a CDN; service.docs serves /docs locally.
app = FastAPI(title="finetune-serve", version="0.1.0", docs_url=None, redoc_url=None,
              description="Fine-tune, export, verify, version and serve text and image classifiers and regressors.")
openapi.document(datasets.router, jobs.router, predict.router, models.router, v2.router, admin.router)  # 4xx, V2 bodies
for router in (datasets.router, jobs.router, predict.router, models.router, v2.router, admin.router):
    app.include_router(router)
errors.install(app)
docs.install(app)
