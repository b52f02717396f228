"""The base models POST /finetune may name: a caller must not make the trainer read any folder of the server.

Over HTTP a base model is "default", a bundled model's own name (the same weights, so it becomes
"default"), or a name the operator lists in FINETUNE_SERVE_BASE_MODELS (hub ids or folders of the
server), matched as written. Anything else gets one message that depends only on the task, never on the
name: the answer does not tell whether a path exists. The CLI runs as its user and takes any folder.

Registered versions are not offered: the core fine-tunes from a folder or a hub id, not from a registry
reference, and a text version's folder loads only with its own number of labels (finetune_core/model.py).
"""

from __future__ import annotations

from finetune_core.config import DEFAULT_BASE_MODEL
from finetune_core.gen_config import DEFAULT_CAUSAL_BASE, GENERATION_TASK
from finetune_core.image_model import DEFAULT_ARCH

from .errors import FieldError
from .settings import env_name, settings

# The names the bundled weights go by (finetune_core/model.py, image_model.py), per kind of task.
BUNDLED = {"text": ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"), "image": (DEFAULT_ARCH,),
           "generation": (DEFAULT_CAUSAL_BASE, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")}


def allowed_base_model(name: str, task: str) -> str:
    """The base model the core gets for a request's `base_model`, or a FieldError on `base_model`."""
    kind = "generation" if task == GENERATION_TASK else "image" if task.startswith("image") else "text"
    bundled = BUNDLED[kind]
    if name == DEFAULT_BASE_MODEL or name in bundled:
        return DEFAULT_CAUSAL_BASE if kind == "generation" else DEFAULT_BASE_MODEL
    configured = settings().base_model_names
    if name in configured:
        return name
    offered = ", ".join(repr(n) for n in (DEFAULT_BASE_MODEL, *bundled, *configured))
    raise FieldError("base_model", f"base_model: not a base model this server offers for {task}; use one of "
                                   f"{offered}. The operator lists more in {env_name('base_models')}")


def allowed_student(name: str | None) -> str | None:
    """A request's `distillation.student` (a model folder), only when the operator lists it, else a FieldError.

    The student folder is read by the trainer like a base model, so the same list governs it; the
    answer does not depend on the name either.
    """
    if name is None or name in settings().base_model_names:
        return name
    raise FieldError("distillation.student", "distillation.student: not a student folder this server offers; leave "
                                             "it out to drop the teacher's layers (distillation.student_layers), or "
                                             f"the operator lists folders in {env_name('base_models')}")
