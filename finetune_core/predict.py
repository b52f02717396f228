"""Predictors: texts in, labels and probabilities (or regression values) out.

A predictor is a tokenizer, the model's metadata and a backend: a function from a tokenized batch
to logits. Backends: ONNX Runtime (fp32 or int8 file), TorchScript, eager PyTorch in fp32 or bf16.
A distilled student (`distilled`, `distilled-int8`) is served by ONNX Runtime with its own metadata
and tokenizer. `load_predictor` picks one for a registered version, by default the fastest accepted
as measured at export (`default_variant`), falling back (with a log line saying why) when the
machine cannot run the one asked for. Load once, predict many; safe to share across threads.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import registry
from .data import tokenize
from .errors import ConfigError, DataError
from .export import Batch, Forward, model_input_names
from .gen_config import GENERATION_TASK
from .gen_predict import GENERATION_VARIANTS, GenerationPredictor, load_generation_predictor
from .metadata import ModelMeta, read_meta
from .model import bf16_supported, logits_of

log = logging.getLogger(__name__)

DISTILLED_VARIANTS = ("distilled", "distilled-int8")  # the student (ONNX fp32) and its int8 form
VARIANTS = ("pytorch", "onnx", "torchscript", "int8", "bf16") + DISTILLED_VARIANTS
# The default for a manifest without measured throughput (written before the figures were recorded):
# the first accepted of these. int8 (accepted only within the accuracy gate) was the fastest everywhere
# in bench/inference.py on 2 cores: 2.0-4.0x eager fp32 from batch 1 to 32, against 1.4-2.0x for bf16
# and 0.9-2.1x for ONNX fp32; then the exact fp32 variants. Images (EfficientNet-Lite0 at 224, static
# int8, 1 thread): int8 1.3-2.0x ONNX fp32, which is 2.1-5.4x eager.
DEFAULT_ORDER = ("distilled-int8", "distilled", "int8", "onnx", "torchscript", "pytorch")
# Throughputs within this share of the fastest count as a tie, which goes to the earlier in DEFAULT_ORDER:
# one pass over a validation split moved by up to ~10% between runs on a busy 2-core machine.
SPEED_TIE = 0.10
# Rows per forward pass when predict() is given many texts: bounds memory, keeps CPU caches warm.
CHUNK_SIZE = 32

class Predictor(Protocol):
    """TextPredictor (texts) or ImagePredictor (images): same outputs, different inputs."""

    variant: str
    meta: ModelMeta  # the model's finetune_serve.json: task, labels, input limits
    backend: Forward  # model inputs by name -> logits

    def logits(self, inputs: Sequence) -> np.ndarray:
        """Raw model outputs, one row per input."""
        ...

    def predict(self, inputs: Sequence, top_k: int | None = None) -> list[dict]:
        """One dict per input: {label, score, scores: {label: prob}} or, for regression, {value}."""
        ...


class TextPredictor:
    """Tokenize (padding to the longest in each chunk, truncating at max_length), run, post-process."""

    def __init__(self, tokenizer, meta: ModelMeta, backend: Forward, variant: str):
        self.tokenizer = tokenizer
        self.meta = meta
        self.backend = backend
        self.variant = variant
        self.input_names = model_input_names(tokenizer)
        # Fast tokenizers set truncation/padding on the shared Rust object for each call: unlocked,
        # concurrent calls got each other's max_length (109 of 2400 in a test), so tokenization is
        # serialised; it is the cheap part of a prediction.
        self._tokenizer_lock = threading.Lock()

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        """Token ids as training made them (data.tokenize), padded to the longest text."""
        max_length = max_length or self.meta.max_length
        with self._tokenizer_lock:
            if self.meta.truncation == "head":  # one call of the fast tokenizer
                encoded = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                                         return_tensors="np")
            else:
                features = tokenize(self.tokenizer, list(texts), max_length, self.meta.truncation)
                encoded = self.tokenizer.pad(features, padding="longest", return_tensors="np")
        return {name: encoded[name].astype(np.int64) for name in self.input_names}

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        chunks = [self.backend(self.encode(texts[i : i + CHUNK_SIZE])) for i in range(0, len(texts), CHUNK_SIZE)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)

    def predict(self, texts: Sequence[str], top_k: int | None = None) -> list[dict]:
        if isinstance(texts, str):
            raise ConfigError("predict: pass a list of texts, not a single string")
        return results(self.logits(list(texts)), self.meta, top_k)


class ImagePredictor:
    """Decode, resize, centre-crop and normalise as in training evaluation, run, post-process.

    Inputs are paths, encoded bytes (JPEG, PNG...), PIL images or HxWx3 uint8 arrays; an input
    that does not decode is a DataError naming its position.
    """

    def __init__(self, meta: ModelMeta, backend: Forward, variant: str):
        from .images import ImageSpec, eval_transform

        self.meta = meta
        self.backend = backend
        self.variant = variant
        self.spec = ImageSpec.from_meta(meta)
        self.transform = eval_transform(self.spec)  # built once, not per image

    def pixels(self, images: Sequence) -> np.ndarray:
        from .images import open_rgb

        out = []
        for index, image in enumerate(images):
            try:
                out.append(self.transform(open_rgb(image, self.spec)).numpy()[None])
            except DataError as err:
                raise DataError(f"image {index}: {err}") from None
            except FileNotFoundError:
                raise DataError(f"image {index}: file '{image}' does not exist") from None
            except (OSError, ValueError, SyntaxError) as err:  # PIL: unidentified, truncated, bad header
                # PIL names an in-memory file by its object repr ("<_io.BytesIO object at 0x...>"): leave it out.
                why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
                raise DataError(f"image {index}: not a decodable image ({why})") from None
        size = self.spec.size
        return np.concatenate(out) if out else np.zeros((0, 3, size, size), dtype=np.float32)

    def logits_from_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Logits for already preprocessed float32 (rows, 3, size, size) input."""
        chunks = [self.backend({"pixel_values": pixel_values[i : i + CHUNK_SIZE]})
                  for i in range(0, len(pixel_values), CHUNK_SIZE)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)

    def logits(self, images: Sequence) -> np.ndarray:
        return self.logits_from_pixels(self.pixels(images))

    def predict(self, images: Sequence, top_k: int | None = None) -> list[dict]:
        if isinstance(images, (str, Path, bytes, bytearray)):
            raise ConfigError("predict: pass a list of images, not a single path or bytes")
        return results(self.logits(list(images)), self.meta, top_k)


def results(logits: np.ndarray, meta: ModelMeta, top_k: int | None) -> list[dict]:
    """Labels and probabilities per row, or {"value"} for regression."""
    if meta.is_regression:
        return [{"value": v} for v in regression_values(logits, meta)]
    return classification_results(logits, meta.labels, top_k)


def classification_results(logits: np.ndarray, labels: list[str], top_k: int | None) -> list[dict]:
    """Softmax per row; `scores` holds the top_k labels (all when None), highest first."""
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k: must be >= 1, got {top_k}")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[: top_k or len(labels)]
        results.append({
            "label": labels[order[0]],
            "score": float(row[order[0]]),
            "scores": {labels[i]: float(row[i]) for i in order},
        })
    return results


def regression_values(logits: np.ndarray, meta: ModelMeta) -> list[float]:
    """Undo the training-time standardisation of the target."""
    values = logits[:, 0].astype(np.float64)
    if meta.target_std is not None:
        values = values * meta.target_std + meta.target_mean
    return [float(v) for v in values]


def onnx_backend(path: str | Path, intra_op_threads: int = 0, inter_op_threads: int = 0,
                 allow_spinning: bool = True) -> Forward:
    """An ONNX Runtime session (CUDA provider when installed and usable, else CPU); 0 threads = ORT default.

    allow_spinning=False makes idle intra-op threads sleep instead of busy-waiting for the next run:
    a server needs that CPU for its own requests.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    accepted = [i.name for i in session.get_inputs()]

    def forward(batch: Batch) -> np.ndarray:
        return session.run(["logits"], {name: batch[name] for name in accepted})[0]

    return forward


def torchscript_backend(path: str | Path, input_names: list[str]) -> Forward:
    """A frozen TorchScript module taking the inputs positionally in `input_names` order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # known: TorchScript sits behind this one function
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load: "deprecated, switch to torch.export"
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(batch[name]) for name in input_names)).float().numpy()

    return forward


def eager_backend(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Forward:
    """The PyTorch model itself, on CUDA when present. Converts `model` in place to `dtype`.

    Floating inputs (pixel_values) are cast to `dtype` too; integer ones (token ids) stay as they are.

    bf16 as weights (model.to(bfloat16)) rather than autocast: on MiniLM fine-tuned on SST-2, batch
    32 x 128 tokens, 2 AVX512-BF16 cores, bf16 weights ran 81-102 seq/s, autocast 80-82, fp32 45-49,
    all three at the same dev accuracy (84.40).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=dtype).eval()

    def forward(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            inputs = {name: _to(torch.from_numpy(array), device, dtype) for name, array in batch.items()}
            return logits_of(model(**inputs)).float().cpu().numpy()

    return forward


def _to(tensor: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)


def measuring_machine() -> dict:
    """What speed figures were measured on: recorded at export, compared when a default is chosen."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def default_variant(info: registry.VersionInfo) -> str:
    """The accepted variant with the highest throughput measured at export; the one served when none is asked for.

    Throughput is the whole validation split in batches of 32, preprocessing included, measured by
    the export on the machine that ran it: in the service the export runs in the training job on the
    serving machine. bf16 is left out where this machine has no native bf16. A version exported on
    another machine (the manifest records which) logs that its figures may not hold here. Speeds
    within SPEED_TIE of the fastest are a tie, broken by DEFAULT_ORDER; a manifest without figures
    uses DEFAULT_ORDER alone.
    """
    variants = info.manifest.variants
    usable = [v for v in VARIANTS if v in variants and variants[v].accepted and (v != "bf16" or bf16_supported())]
    measured = [v for v in usable if variants[v].figures.get("throughput_per_s")]
    if not measured:
        return next(v for v in DEFAULT_ORDER if v in usable)
    where = info.manifest.proof.get("machine")
    if where is not None and where != measuring_machine():
        log.warning("%s: the default variant is chosen by speed measured on another machine (%s); it may not be "
                    "the fastest here (%s): ask for a variant to choose", info.ref, where, measuring_machine())
    best = max(variants[v].figures["throughput_per_s"] for v in measured)
    tied = [v for v in measured if variants[v].figures["throughput_per_s"] >= (1 - SPEED_TIE) * best]
    return min(tied, key=lambda v: DEFAULT_ORDER.index(v) if v in DEFAULT_ORDER else len(DEFAULT_ORDER))


def load_predictor(
    info: registry.VersionInfo,
    variant: str | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    allow_spinning: bool = True,
) -> Predictor | GenerationPredictor:
    """A predictor for a registered version; variant None: the fastest accepted one (`default_variant`).
    A text-generation version gets a GenerationPredictor (gen_predict.py): prompts in, texts out."""
    if info.manifest.model.task == GENERATION_TASK:
        return load_generation_predictor(info, variant)
    variants = info.manifest.variants
    usable = [v for v in VARIANTS if v in variants and variants[v].accepted]
    if variant is None:
        variant = default_variant(info)
    elif variant in GENERATION_VARIANTS and variant not in VARIANTS:
        raise registry.NotFoundError(f"{info.ref} is a {info.manifest.model.task} model and '{variant}' is a "
                                     f"text-generation variant; it has {', '.join(usable)}")
    elif variant not in VARIANTS:
        raise ConfigError(f"variant '{variant}' is unknown; choose one of {', '.join(VARIANTS)}")
    elif variant not in variants:
        raise registry.NotFoundError(f"{info.ref} has no '{variant}' variant; it has {', '.join(usable)}")
    elif not variants[variant].accepted:
        raise registry.RegistryError(
            f"{info.ref}: the '{variant}' variant was refused at export ({variants[variant].reason}); "
            f"use one of {', '.join(usable)}"
        )
    if variant == "bf16" and not bf16_supported():
        fallback = default_variant(info)
        log.warning("%s: bf16 asked for but this machine has no native bf16 (CUDA or AVX512-BF16/AMX CPU); using %s", info.ref, fallback)
        variant = fallback
    if variant in DISTILLED_VARIANTS:
        return _student_predictor(info, variant, intra_op_threads, inter_op_threads, allow_spinning)

    model_dir = registry.model_dir(info)
    meta = read_meta(model_dir)
    if meta.is_image:
        return ImagePredictor(meta, _image_backend(info, variant, model_dir, intra_op_threads, inter_op_threads,
                                                   allow_spinning), variant)
    from transformers import AutoTokenizer  # text models only: an image predictor loads without transformers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if variant in ("onnx", "int8"):
        backend = onnx_backend(registry.variant_file(info, variant), intra_op_threads, inter_op_threads,
                               allow_spinning)
    elif variant == "torchscript":
        backend = torchscript_backend(registry.variant_file(info, variant), model_input_names(tokenizer))
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        backend = eager_backend(model, torch.bfloat16 if variant == "bf16" else torch.float32)
    return TextPredictor(tokenizer, meta, backend, variant)


def _student_predictor(info: registry.VersionInfo, variant: str, intra_op_threads: int, inter_op_threads: int,
                       allow_spinning: bool) -> Predictor:
    """The distilled student: its own metadata (an image student's input size may differ) and ONNX Runtime."""
    folder, onnx_file = registry.student_files(info)
    if variant == "distilled-int8":
        onnx_file = registry.variant_file(info, variant)
    backend = onnx_backend(onnx_file, intra_op_threads, inter_op_threads, allow_spinning)
    meta = read_meta(folder)
    if meta.is_image:
        return ImagePredictor(meta, backend, variant)
    from transformers import AutoTokenizer

    return TextPredictor(AutoTokenizer.from_pretrained(folder), meta, backend, variant)


def _image_backend(info, variant: str, model_dir: Path, intra_op_threads: int, inter_op_threads: int,
                   allow_spinning: bool) -> Forward:
    if variant in ("onnx", "int8"):
        return onnx_backend(registry.variant_file(info, variant), intra_op_threads, inter_op_threads, allow_spinning)
    if variant == "torchscript":
        return torchscript_backend(registry.variant_file(info, variant), ["pixel_values"])
    from .image_model import load_image_model

    model, _ = load_image_model(model_dir)
    return eager_backend(model, torch.bfloat16 if variant == "bf16" else torch.float32)
