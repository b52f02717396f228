"""Our Prometheus metrics, next to BentoML's built-ins at /metrics.

Created by `make_metrics()` inside a worker, never at import: BentoML sets PROMETHEUS_MULTIPROC_DIR
when a worker starts, and prometheus_client must see it to share figures across workers.
Label values are bounded: variants and outcomes are fixed sets, model names are the registered ones
(capped at MAX_MODEL_LABELS, the rest counted as "other").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from finetune_core import registry

from .jobs import STATES

MAX_MODEL_LABELS = 50


@dataclass
class Metrics:
    predictions: object  # Counter: model, variant, outcome
    prediction_latency: object  # Histogram: variant
    prediction_batch: object  # Histogram: inputs per request
    inference_batch: object  # Histogram: texts per inference batch (concurrent requests merged)
    model_load: object  # Histogram: seconds to load a predictor
    model_load_failures: object  # Counter: model, version, reason (integrity | not_found | error)
    models_loaded: object  # Gauge
    jobs: object  # Gauge: state
    job_duration: object  # Histogram: outcome
    training_loss: object  # Gauge
    training_samples_per_second: object  # Gauge
    dataset_uploads: object  # Counter: outcome (accepted | rejected), reason
    images_predicted: object  # Counter: input (base64 | multipart | v2_bytes | v2_uint8 | v2_fp32)
    image_decode_failures: object  # Counter: reason (base64 | too_large | undecodable | tensor)
    image_decode_seconds: object  # Histogram: decoding and preprocessing one request's images
    image_bytes: object  # Histogram: size of one encoded image received
    requests_shed: object  # Counter: route (predict | v2_infer), answered 429 by service.shedding

    def __post_init__(self):
        self._models: set[str] = set()
        self._lock = threading.Lock()

    def model_label(self, name: str | None) -> str:
        """The name itself for the first MAX_MODEL_LABELS registered names seen, else 'other'."""
        if not name:
            return "none"
        with self._lock:
            if name in self._models or len(self._models) < MAX_MODEL_LABELS:
                self._models.add(name)
                return name
        return "other"

    def load_failed(self, info: registry.VersionInfo, err: Exception) -> None:
        """Count a predictor that did not load: a file failing its checksum is `integrity`."""
        reason = ("integrity" if isinstance(err, registry.IntegrityError)
                  else "not_found" if isinstance(err, registry.NotFoundError) else "error")
        self.model_load_failures.labels(model=self.model_label(info.name), version=info.version, reason=reason).inc()

    def set_jobs(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))


def make_metrics() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    return Metrics(
        predictions=Counter("finetune_predictions", "Prediction requests by model, variant and outcome",
                            ["model", "variant", "outcome"]),
        prediction_latency=Histogram("finetune_prediction_latency_seconds", "Time to answer a /predict request",
                                     ["variant"], buckets=latency),
        prediction_batch=Histogram("finetune_prediction_batch_size", "Inputs (texts or images) per /predict request",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        inference_batch=Histogram("finetune_inference_batch_size",
                                  "Inputs per inference batch, after merging concurrent /predict requests",
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        model_load=Histogram("finetune_model_load_seconds", "Time to load a predictor",
                             buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        model_load_failures=Counter("finetune_model_load_failures",
                                    "Predictors that failed to load, by model, version and reason",
                                    ["model", "version", "reason"]),
        models_loaded=Gauge("finetune_models_loaded", "Predictors held in memory", multiprocess_mode="livesum"),
        jobs=Gauge("finetune_jobs", "Jobs in the store by state", ["state"], multiprocess_mode="mostrecent"),
        job_duration=Histogram("finetune_job_duration_seconds", "Wall time of a finished training job", ["outcome"],
                               buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)),
        training_loss=Gauge("finetune_training_loss", "Last training loss of the running job",
                            multiprocess_mode="mostrecent"),
        training_samples_per_second=Gauge("finetune_training_samples_per_second",
                                          "Training throughput of the running job", multiprocess_mode="mostrecent"),
        dataset_uploads=Counter("finetune_dataset_uploads", "Dataset uploads by outcome and reason",
                                ["outcome", "reason"]),
        images_predicted=Counter("finetune_images_predicted", "Images answered by /predict and V2 infer, by input kind",
                                 ["input"]),
        image_decode_failures=Counter("finetune_image_decode_failures",
                                      "Request images refused: bad base64, too large, undecodable, bad tensor",
                                      ["reason"]),
        image_decode_seconds=Histogram("finetune_image_decode_seconds",
                                       "Time to decode and preprocess one request's images",
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)),
        image_bytes=Histogram("finetune_image_bytes", "Size of one encoded image received",
                              buckets=(1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7)),
        requests_shed=Counter("finetune_requests_shed", "Prediction requests answered 429 by the in-flight limit",
                              ["route"]),
    )
