"""The model registry over HTTP: list, show, promote."""

from __future__ import annotations

from fastapi import APIRouter

from finetune_core import registry

from ..schemas import PromoteRequest

router = APIRouter(tags=["models"])


@router.get("/models")
def list_models() -> dict:
    return {"models": registry.list_models()}


@router.get("/models/{name}")
def show_model(name: str) -> dict:
    return registry.show(name)


@router.post("/models/{name}/promote")
def promote_model(name: str, body: PromoteRequest) -> dict:
    info = registry.promote(name, body.version)
    return {"name": info.name, "production": info.version}
