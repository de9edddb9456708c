"""timm models with their hub weights: from the local cache when it holds them, over the
network only when the hub answers.

timm fetches pretrained weights with huggingface_hub, which retries an unreachable hub
five times per file with growing waits, warning at each try: offline, `--pretrained`
took close to a minute and printed 22 warnings before failing. Here the cache is tried
first with the hub's offline mode on (no request at all), then one TCP connect to the
hub (or the proxy in front of it) decides whether downloading is worth trying.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import huggingface_hub.constants
import timm
from torch import nn

from histodetect.errors import UserError

CONNECT_TIMEOUT_S = 5.0


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub reads its offline switch at each request: cache only, no network."""
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = before


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one TCP connect, at most CONNECT_TIMEOUT_S), or None."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 8080
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"cannot connect to {host}:{port}: {error.strerror or type(error).__name__}"
    return None


def create_pretrained(name: str, timm_name: str, **kwargs) -> nn.Module:
    """timm.create_model(timm_name, pretrained=True, **kwargs), failing in one line offline."""
    try:
        with _hub_offline():
            return timm.create_model(timm_name, pretrained=True, **kwargs)
    except OSError:  # not in the cache (LocalEntryNotFoundError) or a URL-hosted file not downloaded
        pass
    why = hub_unreachable()
    if why is not None:
        problem = f"the Hugging Face hub is unreachable here ({why})"
    else:
        try:
            return timm.create_model(timm_name, pretrained=True, **kwargs)
        except OSError as error:
            # huggingface_hub's HTTP errors, httpx's and urllib's connection errors all derive from OSError.
            problem = f"downloading them failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    raise UserError(
        f"model '{name}': --pretrained needs timm's weights, which are not in the local cache and "
        f"{problem}; download them elsewhere and pass --weights FILE"
    )
