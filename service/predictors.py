"""Predictors loaded once and shared; an alias (`production`, `latest`) follows its version.

When the version an alias points at changes, the version served so far keeps answering while the
new one loads in the background; the switch happens when it is ready. A pinned version (`v3`)
loads on first use. At most `max_loaded` predictors are kept (least recently used goes first).
A name and ref resolve to a version from the registry at most once every RESOLVE_SECONDS, so a
promotion is seen within that time and a busy server does not read the registry per request.

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


def load_for_serving(info: registry.VersionInfo, variant: str | None) -> Predictor:
    """load_predictor with the server's ONNX Runtime settings: intra-op threads and spinning.

    Idle ORT threads spin by default, taking CPU the HTTP server needs between batches.
    """
    return load_predictor(info, variant, intra_op_threads=settings().ort_threads,
                          allow_spinning=settings().ort_spinning)


class Predictors:
    def __init__(self, load: Loader = load_for_serving, max_loaded: int = 4,
                 on_load: Callable[[float], None] = lambda seconds: None):
        self.load = load
        self.max_loaded = max_loaded
        self.on_load = on_load
        self._loaded: OrderedDict[Key, Predictor] = OrderedDict()
        self._alias: dict[tuple[str, str | None, str | None], str] = {}  # (name, ref, variant) -> version served
        self._loading: dict[Key, threading.Lock] = {}
        self._resolved: dict[tuple[str, str | None], tuple[float, registry.VersionInfo]] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, ref: str | None) -> registry.VersionInfo:
        """registry.resolve, remembered for RESOLVE_SECONDS; a bad name or ref is a ConfigError naming it."""
        now = time.monotonic()
        remembered = self._resolved.get((name, ref))
        if remembered is not None and now - remembered[0] < RESOLVE_SECONDS:
            return remembered[1]
        registry.parse_ref(f"{name}:{ref}" if ref else name)
        info = registry.resolve(name, ref)
        self._resolved[(name, ref)] = (now, info)
        return info

    def get(self, name: str, ref: str | None, variant: str | None) -> tuple[registry.VersionInfo, Predictor]:
        """The predictor for NAME at REF (vN, latest, production; None: production, else latest)."""
        info = self.resolve(name, ref)
        return self._in_memory(name, ref, variant, info) or self._load_for(name, ref, variant, info)

    def get_if_loaded(self, name: str, ref: str | None, variant: str | None) -> tuple[registry.VersionInfo, Predictor] | None:
        """Like get, but None where get would wait for a load: an event loop can then call get in a thread."""
        return self._in_memory(name, ref, variant, self.resolve(name, ref))

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
                self._start_background(key, info, alias)
                return self.resolve(name, previous), self._loaded[old_key]
        return None

    def _load_for(self, name: str, ref: str | None, variant: str | None, info: registry.VersionInfo):
        key, alias = (name, info.version, variant), (name, ref, variant)
        predictor = self._load(key, info)
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
            predictor = self.load(info, key[2])
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
            except Exception as err:  # the next request loads synchronously and reports the error to its caller
                log.warning("could not load %s (%s); the next request will retry and report it", info.ref, err)
                with self._lock:
                    self._alias.pop(alias, None)
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
