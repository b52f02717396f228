"""The service's FINETUNE_SERVE_* environment settings: each declared, documented and bounded here, once.

`settings()` reads and validates them the first time it is called (at start-up: service.bento asks
for the worker count at import) and the whole service takes its values from it. A bad value stops
the start with one error naming the variable and what it allows. The core reads HOME, CACHE and
IMAGE_WORKERS itself (it never imports pydantic); they are declared here too, so they are checked at
start-up and documented in the same table. README.md's settings table is `markdown_table()`.
"""

from __future__ import annotations

import functools

from annotated_types import Ge, Gt, Le
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune_core.errors import ConfigError

PREFIX = "FINETUNE_SERVE_"
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore")

    home: str = Field("./.finetune-serve", description="job store (`jobs.sqlite3`, unless `FINETUNE_SERVE_DATABASE_URL`), "
                                                       "uploaded datasets, run folders and the model registry (read by "
                                                       "the core); one folder every API replica and trainer shares")
    cache: str = Field("~/.cache/finetune-serve", description="where the bundled MiniLM is unpacked (read by the core)")
    api_key: SecretStr | None = Field(None, description="the API key, see Authentication; unset: the API is open")
    allow_no_auth: bool = Field(False, description="let a server without `FINETUNE_SERVE_API_KEY` listen on an address "
                                                   "other than loopback (`bentoml serve --host 0.0.0.0`, BentoML's "
                                                   "default); unset, such a server refuses to start")
    base_models: str | None = Field(None, description="base models `POST /finetune` accepts beside `default` and the "
                                                      "bundled models' names: comma-separated hub ids or folders of this "
                                                      "server; unset: those alone (the CLI takes any)")
    max_upload_mb: float = Field(100, gt=0, le=1 << 20, description="upload size limit (413 above it)")
    max_extracted_mb: float = Field(2048, gt=0, le=1 << 20, description="most an uploaded zip may expand to (422 above it)")
    max_zip_entries: int = Field(100_000, ge=1, le=10_000_000, description="most entries an uploaded zip may hold")
    api_workers: int = Field(1, ge=1, le=64, description="API worker processes (each holds its own loaded models; "
                                                         "metrics are summed across them)")
    max_batch: int = Field(32, ge=1, le=4096, description="most texts or images one batch of `/predict`'s adaptive "
                                                          "batching takes")
    max_wait_ms: float = Field(0, ge=0, le=10_000, description="how long an idle predictor waits for more requests "
                                                               "before running a batch")
    # bench/serve_bench.py --sweep (MiniLM int8, 32 clients, one text each, 2 cores shared with the HTTP
    # loop and the load generator): 2 threads without spinning 260 req/s (p99 189 ms); 1 thread 236;
    # 1 thread spinning 216; 2 threads spinning 187 (the spinning threads took the HTTP loop's CPU).
    ort_threads: int = Field(2, ge=0, le=1024, description="ONNX Runtime intra-op threads per served model "
                                                           "(0: one per core)")
    ort_spinning: bool = Field(False, description="let idle ONNX Runtime threads spin (off: spinning threads took the "
                                                  "CPU the HTTP loop needed)")
    # Overload (service.shedding; bench/load): 128 in flight at ~490 req/s (MiniLM int8, 2 cores) is ~0.26 s of
    # work queued per worker; 64 shed the bursts of an open-loop soak at 70% of the maximum.
    max_inflight: int = Field(128, ge=1, le=100_000, description="`/predict` and V2 infer requests one API worker "
                                                                "serves at once; one more waits (below), then is "
                                                                "answered 429 with `Retry-After`")
    max_queue_ms: float = Field(100, ge=0, le=60_000, description="how long a prediction request over "
                                                                  "`FINETUNE_SERVE_MAX_INFLIGHT` waits for a slot "
                                                                  "before its 429")
    train_nice: int = Field(10, ge=0, le=19, description="niceness of the training child process, so training does "
                                                         "not starve `/predict`")
    image_workers: int = Field(0, ge=0, le=256, description="image decoding processes beside training (read by the core)")
    # Several processes (Kubernetes: API replicas and trainer pods) share the job store and HOME.
    database_url: SecretStr | None = Field(
        None, description="the job store's PostgreSQL database, `postgresql://USER:PASSWORD@HOST:5432/DATABASE`, shared "
                          "by API replicas and trainers; unset: SQLite in HOME", json_schema_extra={"allowed": "a URL "
                          "starting postgresql:// (or postgres://, postgresql+psycopg://)"})
    trainer_url: str | None = Field(
        None, description="`service.bento:Api` only: a trainer to wake when a job is queued, e.g. "
                          "`http://finetune-trainer:3000`; unset, or unreachable: trainers find the job on their next "
                          "poll", json_schema_extra={"allowed": "a URL starting http:// or https://"})
    trainer_name: str | None = Field(
        None, min_length=1, max_length=200, description="this trainer's name in the job store; unset: the host name (in "
                                                        "Kubernetes the pod's). A trainer restarted under its old name "
                                                        "takes its interrupted job back at once")
    job_lease_seconds: float = Field(30, ge=1, le=3600, description="how long a running job stays its trainer's "
                                                                    "without a heartbeat (sent every third of it); then "
                                                                    "another trainer resumes it from its checkpoint")
    trainer_devices: int = Field(1, ge=1, le=64, description="GPUs each trainer asks for (BentoML `resources`); a job "
                                                             "trains on one of them today")
    retention_days: float = Field(0, ge=0, le=36_500, description="what trainers delete, at start and hourly (service."
                                                                  "retention): the checkpoints and step events of jobs "
                                                                  "finished this many days ago, and uploads this old "
                                                                  "that no queued or running job uses; 0: keep "
                                                                  "everything")

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not url.get_secret_value().startswith(POSTGRES_SCHEMES):
            raise ValueError("not a PostgreSQL URL")
        return url

    @field_validator("trainer_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("not an HTTP URL")
        return url.rstrip("/") if url else url

    @property
    def base_model_names(self) -> tuple[str, ...]:
        """FINETUNE_SERVE_BASE_MODELS as names, blanks dropped."""
        return tuple(name.strip() for name in (self.base_models or "").split(",") if name.strip())

    @property
    def has_api_key(self) -> bool:
        """A key is set and not empty (an empty one leaves the API open, service.guard)."""
        return bool(self.api_key and self.api_key.get_secret_value())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_extracted_bytes(self) -> int:
        return int(self.max_extracted_mb * 2**20)


SECRET_FIELDS = ("api_key", "database_url")


class SettingsError(ConfigError):
    """A FINETUNE_SERVE_* variable holds a value the service cannot use."""


@functools.cache
def settings() -> Settings:
    """The settings of this process, read once."""
    try:
        return Settings()
    except ValidationError as err:
        problems = []
        for error in err.errors():
            name = str(error["loc"][0])
            shown = "'***'" if name in SECRET_FIELDS else repr(error.get("input"))  # a URL's password stays out of logs
            problems.append(f"{env_name(name)}={shown}: {error['msg']}; allowed: {allowed(name)}")
        raise SettingsError("; ".join(problems)) from None


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def allowed(field: str) -> str:
    """What a setting accepts, in words, from its type and bounds."""
    info = Settings.model_fields[field]
    if info.json_schema_extra and "allowed" in info.json_schema_extra:
        return info.json_schema_extra["allowed"]
    if info.annotation is bool:
        return "0 or 1 (or true, false)"
    kind = {int: "a whole number", float: "a number"}.get(info.annotation, "any text")
    bounds = []
    for bound in info.metadata:
        if isinstance(bound, Ge):
            bounds.append(f">= {bound.ge}")
        elif isinstance(bound, Gt):
            bounds.append(f"> {bound.gt}")
        elif isinstance(bound, Le):
            bounds.append(f"<= {bound.le}")
    return " ".join([kind, " and ".join(bounds)]).strip()


def markdown_table() -> str:
    """README.md's settings table: variable, default and description of every setting."""
    rows = ["| environment variable | default | what |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = "unset" if info.default is None else f"`{int(info.default) if info.default is False else info.default}`"
        rows.append(f"| `{env_name(name)}` | {default} | {info.description} |")
    return "\n".join(rows)
