"""Predictors loaded once and shared; an alias (`production`, `latest`) follows its version.

When the version an alias points at changes, the version served so far keeps answering while the
new one loads in the background; the switch happens when it is ready. A pinned version (`v3`)
loads on first use. At most `max_loaded` predictors are kept (least recently used goes first).
When the new version fails to load (a file that fails its checksum, a broken export), the alias keeps
serving the version it served before, the failure is reported to `on_failure`, and the load is tried
again after RETRY_FAILED_SECONDS, not per request; asking for that version by number gets the error.
A worker with no older version in memory serves the previous production when production fails its checksum.
A name and ref resolve to a version from the registry at most once every RESOLVE_SECONDS, and the
model a request that names none gets (the only registered one) is looked up as seldom: a promotion or
a new model is seen within that time by every worker sharing the registry folder, and a busy server
does not read the registry per request. `get_cached` answers from memory alone, so an event loop can
call it; anything that reads the registry or loads a model goes through `get`, in a thread.

ONNX Runtime thread settings for serving come from service.settings (see `load_for_serving`).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from finetune_core import registry
from finetune_core.errors import ConfigError
from finetune_core.predict import Predictor, load_predictor

from .settings import settings

log = logging.getLogger("service.predictors")

Loader = Callable[[registry.VersionInfo, str | None], Predictor]
Key = tuple[str, str, str | None]  # (name, version, variant asked for)

RESOLVE_SECONDS = 1.0
# A failed background load is retried this long after it failed: a damaged file stays damaged until someone
# restores it, and every try hashes the whole version again.
RETRY_FAILED_SECONDS = 30.0


def load_for_serving(info: registry.VersionInfo, variant: str | None) -> Predictor:
    """load_predictor with the server's ONNX Runtime settings: intra-op threads and spinning.

    Idle ORT threads spin by default, taking CPU the HTTP server needs between batches.
    """
    return load_predictor(info, variant, intra_op_threads=settings().ort_threads,
                          allow_spinning=settings().ort_spinning)


class Predictors:
    def __init__(self, load: Loader = load_for_serving, max_loaded: int = 4,
                 on_load: Callable[[float], None] = lambda seconds: None,
                 on_failure: Callable[[registry.VersionInfo, Exception], None] = lambda info, err: None,
                 clock: Callable[[], float] = time.monotonic):
        self.load = load
        self.max_loaded = max_loaded
        self.on_load = on_load
        self.on_failure = on_failure
        self.clock = clock  # what RESOLVE_SECONDS is measured on: a test passes one it controls
        self._default: tuple[float, str] | None = None  # (when, the only registered model)
        self._loaded: OrderedDict[Key, Predictor] = OrderedDict()
        self._alias: dict[tuple[str, str | None, str | None], str] = {}  # (name, ref, variant) -> version served
        self._loading: dict[Key, threading.Lock] = {}
        self._failed: dict[Key, float] = {}  # when a background load of the key last failed
        self._resolved: dict[tuple[str, str | None], tuple[float, registry.VersionInfo]] = {}
        self._lock = threading.Lock()

    def default_name(self) -> str:
        """The model a request that names none gets (only_model), remembered for RESOLVE_SECONDS."""
        name = self._fresh(self._default)
        if name is None:
            now = self.clock()
            name = only_model()
            self._default = (now, name)
        return name

    def resolve(self, name: str, ref: str | None) -> registry.VersionInfo:
        """registry.resolve, remembered for RESOLVE_SECONDS; a bad name or ref is a ConfigError naming it."""
        info = self._fresh(self._resolved.get((name, ref)))
        if info is None:
            now = self.clock()
            registry.parse_ref(f"{name}:{ref}" if ref else name)
            info = registry.resolve(name, ref)
            self._resolved[(name, ref)] = (now, info)
        return info

    def get(self, name: str | None, ref: str | None, variant: str | None) -> tuple[registry.VersionInfo, Predictor]:
        """The predictor for NAME (None: default_name) at REF (vN, latest, production; None: production, else
        latest)."""
        name = name or self.default_name()
        info = self.resolve(name, ref)
        return self._in_memory(name, ref, variant, info) or self._load_for(name, ref, variant, info)

    def get_cached(self, name: str | None, ref: str | None,
                   variant: str | None) -> tuple[registry.VersionInfo, Predictor] | None:
        """get's answer when memory alone holds it (the name and ref resolved within RESOLVE_SECONDS, the predictor
        loaded), else None: it never reads the registry or waits for a load, so an event loop may call it."""
        name = name or self._fresh(self._default)
        info = self._fresh(self._resolved.get((name, ref))) if name else None
        if info is None:
            return None
        key = (name, info.version, variant)
        with self._lock:
            predictor = self._loaded.get(key)
            if predictor is None:
                return None
            self._loaded.move_to_end(key)
            self._alias[(name, ref, variant)] = info.version
        return info, predictor

    def _fresh(self, remembered: tuple[float, object] | None):
        """A remembered (when, value)'s value while younger than RESOLVE_SECONDS, else None."""
        if remembered is not None and self.clock() - remembered[0] < RESOLVE_SECONDS:
            return remembered[1]
        return None

    def _in_memory(self, name: str, ref: str | None, variant: str | None, info: registry.VersionInfo):
        key = (name, info.version, variant)
        pinned = ref is not None and ref not in (registry.LATEST, registry.PRODUCTION)
        alias = (name, ref, variant)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                self._alias[alias] = info.version
                return info, self._loaded[key]
            previous = None if pinned else self._alias.get(alias)
            old_key = (name, previous, variant)
            if previous is not None and old_key in self._loaded:
                failed = self._failed.get(key)
                if failed is None or self.clock() - failed >= RETRY_FAILED_SECONDS:
                    self._start_background(key, info, alias)
                return self.resolve(name, previous), self._loaded[old_key]
        return None

    def _load_for(self, name: str, ref: str | None, variant: str | None, info: registry.VersionInfo):
        key, alias = (name, info.version, variant), (name, ref, variant)
        try:
            predictor = self._load(key, info)
        except registry.IntegrityError:
            # Production that fails its checksum with no older version in memory (a fresh worker): the previous
            # production answers, as it would have had this worker been up before the promote.
            previous = registry.previous_production(name) if ref in (None, registry.PRODUCTION) else None
            if previous is None or info.version != registry.resolve(name, registry.PRODUCTION).version:
                raise
            log.error("%s fails its checksum; %s:production falls back to %s", info.ref, name, previous)
            with self._lock:
                self._failed[key] = self.clock()
            info = self.resolve(name, previous)
            predictor = self._load((name, previous, variant), info)
        with self._lock:
            self._alias[alias] = info.version
        return info, predictor

    def loaded(self) -> list[Key]:
        with self._lock:
            return list(self._loaded)

    def _load(self, key: Key, info: registry.VersionInfo) -> Predictor:
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # concurrent first requests for one key load it once
            with self._lock:
                if key in self._loaded:
                    return self._loaded[key]
            started = time.perf_counter()
            try:
                predictor = self.load(info, key[2])
            except Exception as err:
                with self._lock:
                    self._loading.pop(key, None)  # so a later background load is not taken for one in progress
                self.on_failure(info, err)
                raise
            # A model brings ~300k long-lived Python objects (torch, transformers, the tokenizer). Frozen, the
            # collector's full passes skip them: under 32 concurrent clients those passes ran every 2-3 s for
            # 140-200 ms each, holding the GIL, and set p99 (bench/serve_bench.py: p99 339 -> 153 ms).
            gc.freeze()
            self.on_load(time.perf_counter() - started)
            with self._lock:
                self._loaded[key] = predictor
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
                self._loading.pop(key, None)
            log.info("loaded %s variant %s in %.2fs", info.ref, predictor.variant, time.perf_counter() - started)
            return predictor

    def _start_background(self, key: Key, info: registry.VersionInfo, alias) -> None:
        if key in self._loading:
            return

        def work() -> None:
            try:
                self._load(key, info)
                with self._lock:
                    self._alias[alias] = info.version
                    self._failed.pop(key, None)
            except Exception as err:  # the alias keeps its old version; asked for by number, this one reports the error
                log.error("could not load %s (%s); %s keeps serving %s, retrying in %.0fs", info.ref, err,
                          f"{alias[0]}:{alias[1] or 'default'}", self._alias.get(alias), RETRY_FAILED_SECONDS)
                with self._lock:
                    self._failed[key] = self.clock()
                    self._loading.pop(key, None)

        self._loading[key] = threading.Lock()
        threading.Thread(target=work, name=f"load-{info.ref}", daemon=True).start()


def only_model() -> str:
    """The model to use when a request names none: the only registered one."""
    names = [m["name"] for m in registry.list_models()]
    if len(names) == 1:
        return names[0]
    if not names:
        raise registry.NotFoundError("model: no model is registered yet; fine-tune one with POST /finetune")
    raise ConfigError(f"model: required when several models are registered ({', '.join(names[:10])})")
