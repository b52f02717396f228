"""fit(): the one training loop. Loss, evaluation, events and cancellation are arguments."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from .config import LOWER_IS_BETTER
from .data import batch_order
from .model import bf16_supported, logits_of

EvalFn = Callable[[nn.Module], dict]  # model -> validation metrics, "loss" included
EventFn = Callable[[dict], None]
# A batch: "inputs" are the model's keyword arguments; every other key is for the loss ("labels", and
# whatever a Rows adds: teacher logits for distillation, a token mask for generation).
Batch = dict[str, "torch.Tensor | dict[str, torch.Tensor]"]


class LossFn(Protocol):
    """The training loss. It receives the whole batch, so a loss can use more than logits and labels.

    `logits` are the model's outputs for `batch["inputs"]` as float32; the result is a scalar tensor,
    the mean over the batch. losses.py has the task losses; evaluation calls the same function with a
    batch of {"labels": ...} over a whole split.
    """

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...


class Rows(Protocol):
    """Training or evaluation rows: tokenized texts (data.Encoded) or images (images.ImageRows)."""

    targets: list
    lengths: list[int]  # per-row lengths for length grouping

    def loader(self, batches: list[list[int]], epoch: int = 0) -> Iterable[Batch]:
        """One Batch per list of row indices; `epoch` seeds augmentation."""
        ...


@dataclass
class FitState:
    """Where the loop is: saved in last.pt so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps done
    best: float | None = None  # best value of the early-stopping metric so far
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    samples: int = 0  # training rows seen
    train_seconds: float = 0.0  # training time alone: evaluation and checkpoint writes are not counted


@dataclass
class FitResult:
    status: str  # completed | stopped_early | cancelled
    epochs_run: int
    global_step: int
    best_metric: float | None
    best_step: int | None
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    samples_per_second: float = 0.0
    wall_seconds: float = 0.0
    precision: str = "fp32"


def pick_precision(requested: str) -> str:
    """bf16 autocast where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if requested != "auto":
        return requested
    return "bf16" if bf16_supported() else "fp32"


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Weight decay on weight matrices only, never on biases and LayerNorm (the usual BERT recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernels do one pass over all parameters per step: on MiniLM on 2 CPU cores a step's
    # optimizer update took ~14 ms fused against ~76 ms plain (a fifth of the whole training time).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def make_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    train: Rows,
    cfg,  # TrainConfig
    *,
    loss_fn: LossFn,
    evaluate_fn: EvalFn,
    checkpoint_dir: str | Path,
    resume: bool = False,
    on_event: EventFn = lambda event: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> FitResult:
    device = next(model.parameters()).device
    precision = pick_precision(cfg.precision)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    batches_per_epoch = math.ceil(len(train.targets) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = make_schedule(optimizer, cfg.schedule, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    higher_is_better = cfg.early_stopping_metric not in LOWER_IS_BETTER

    s = FitState()
    torch.manual_seed(cfg.seed)
    if resume and (checkpoint_dir / "last.pt").is_file():
        s = _load_checkpoint(checkpoint_dir / "last.pt", model, optimizer, scheduler)
    on_event({"type": "start", "total_steps": total_steps, "epochs": cfg.epochs, "step": s.step,
              "train_rows": len(train.targets), "precision": precision, "resumed": resume and s.step > 0})
    clock = _TrainingClock(s)

    def evaluate_and_track() -> bool:
        """Evaluate, keep the best weights, and say whether patience has run out."""
        with clock.paused():
            metrics = evaluate_fn(model)
            model.train()
            value = metrics[cfg.early_stopping_metric]
            improved = s.best is None or (value > s.best if higher_is_better else value < s.best)
            if improved:
                s.best, s.best_step, s.bad_evals = value, s.step, 0
                _atomic_save({"model": model.state_dict(), "step": s.step, "metrics": metrics}, checkpoint_dir / "best.pt")
            else:
                s.bad_evals += 1
            s.history.append({"epoch": s.epoch + s.batch / batches_per_epoch, "step": s.step, **metrics})
            on_event({"type": "eval", "epoch": s.epoch, "step": s.step, "metrics": metrics, "improved": improved})
        return 0 < cfg.early_stopping_patience <= s.bad_evals

    def save_last() -> None:
        with clock.paused():
            _save_last(checkpoint_dir, model, optimizer, scheduler, s)

    status = "completed"
    model.train()
    while s.epoch < cfg.epochs and status == "completed":
        order = batch_order(train.lengths, cfg.batch_size, True, cfg.group_by_length, cfg.seed, s.epoch)
        tick, window = time.perf_counter(), 0
        for i, batch in enumerate(train.loader(order[s.batch:], s.epoch), start=s.batch):
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = logits_of(model(**batch["inputs"]))
            loss = loss_fn(logits.float(), batch)
            (loss / cfg.gradient_accumulation).backward()
            rows = len(batch["labels"])
            s.samples += rows
            window += rows
            s.batch = i + 1
            if s.batch % cfg.gradient_accumulation and s.batch < batches_per_epoch:
                continue
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            s.step += 1
            if s.step % cfg.log_every_steps == 0:
                now = time.perf_counter()
                on_event({"type": "step", "epoch": s.epoch, "step": s.step, "total_steps": total_steps,
                          "loss": loss.item(), "learning_rate": scheduler.get_last_lr()[0],
                          "samples_per_second": window / max(now - tick, 1e-9)})
                tick, window = now, 0
            if cfg.eval_every_steps and s.step % cfg.eval_every_steps == 0 and s.batch < batches_per_epoch:
                if evaluate_and_track():
                    status = "stopped_early"
            if cfg.checkpoint_every_steps and s.step % cfg.checkpoint_every_steps == 0:
                save_last()
            if should_stop():
                status = "cancelled"
            if status != "completed":
                break
        if status == "completed":
            s.epoch, s.batch = s.epoch + 1, 0
            if evaluate_and_track():
                status = "stopped_early"
        save_last()
        on_event({"type": "checkpoint", "step": s.step, "epoch": s.epoch, "status": status})

    if status != "cancelled" and (checkpoint_dir / "best.pt").is_file():
        best = torch.load(checkpoint_dir / "best.pt", map_location=device, weights_only=True)
        model.load_state_dict(best["model"])
    result = FitResult(status, s.epoch, s.step, s.best, s.best_step, s.history,
                       s.samples / max(s.train_seconds, 1e-9), s.train_seconds, precision)
    on_event({"type": "end", "status": status, "step": s.step, "epochs_run": s.epoch,
              "samples_per_second": result.samples_per_second})
    return result


class _TrainingClock:
    """Adds training time to state.train_seconds; evaluation and checkpoint writes run paused.

    The one place elapsed time is kept, so samples/s means the same as the Trainer's in the benchmark.
    """

    def __init__(self, state: FitState):
        self.state = state
        self.since = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self.state.train_seconds += time.perf_counter() - self.since
        try:
            yield
        finally:
            self.since = time.perf_counter()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: _to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in batch.items()}


def _save_last(checkpoint_dir: Path, model, optimizer, scheduler, s: FitState) -> None:
    """Everything a resumed run needs to continue exactly: weights, optimizer, schedule, RNG, position."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loop": dataclasses.asdict(s),
    }
    _atomic_save(state, checkpoint_dir / "last.pt")


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> FitState:
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return FitState(**state["loop"])


def _atomic_save(obj, path: Path) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    torch.save(obj, tmp)
    os.replace(tmp, path)
