"""Refuse to serve an open API to the network: no API key and an address other than loopback stops the start.

`bentoml serve` binds 0.0.0.0 unless told `--host` (BentoML's default, and what a container needs), so a
server started without FINETUNE_SERVE_API_KEY would take jobs and uploads from anyone who reaches it.
`check_exposure()` runs in the `bentoml serve` process itself (an on_deployment hook of FinetuneServe and
Api), before any worker starts, so a refused start exits at once with status 2 rather than leaving
workers to be restarted. FINETUNE_SERVE_ALLOW_NO_AUTH=1 serves open anyway (a network that is private by
other means); an open server on loopback is only warned about. The trainer is not checked: its two
routes (wake, status) carry no data and no key (service.bento).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Literal

from .settings import env_name, settings

log = logging.getLogger("service.exposure")


Exposure = Literal["keyed", "open-loopback", "open-allowed", "refused"]


def exposure(host: str, has_key: bool, allow_no_auth: bool) -> Exposure:
    """What serving on `host` amounts to: a key guards it, open but local, open by the operator's choice, or refused."""
    if has_key:
        return "keyed"
    if _is_loopback(host):
        return "open-loopback"
    return "open-allowed" if allow_no_auth else "refused"


def bound_host() -> str:
    """The address `bentoml serve` binds: its --host (or BENTOML_HOST), else BentoML's configured http.host."""
    import click
    from bentoml._internal.configuration.containers import BentoMLContainer

    context = click.get_current_context(silent=True)
    host = context.params.get("host") if context is not None else None
    return host or BentoMLContainer.http.host.get()


def check_exposure(host: str | None = None) -> None:
    """Log how open the server is; exit with status 2 when it would be open to the network."""
    host = host or bound_host()
    key, allow = env_name("api_key"), env_name("allow_no_auth")
    verdict = exposure(host, settings().has_api_key, settings().allow_no_auth)
    if verdict == "refused":
        log.error("refusing to start: no API key (%s) and listening on %s, beyond this machine, so anyone who reaches "
                  "it could upload data and start jobs. Set %s, or bind --host 127.0.0.1, or set %s=1 to serve "
                  "without a key on a network you trust", key, host, key, allow)
        raise SystemExit(2)
    if verdict == "open-allowed":
        log.warning("serving WITHOUT an API key on %s, beyond this machine, because %s=1; set %s to require one",
                    host, allow, key)
    elif verdict == "open-loopback":
        log.warning("serving without an API key on %s (this machine only); set %s to require one", host, key)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
