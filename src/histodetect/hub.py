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
import importlib
import os
import pickle
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub.constants
import huggingface_hub.errors
import timm
import torch.hub
from safetensors import SafetensorError
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


# The port a proxy URL without one means to the clients that use it (httpx, urllib).
PROXY_DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks5": 1080, "socks5h": 1080}


def _weights_url(timm_name: str) -> str | None:
    """The URL timm downloads `timm_name`'s weights from when they are not on the hub
    (legacy_xception's are a GitHub release file), else None: the hub has them."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or cfg.hf_hub_id or not cfg.url:
        return None
    return cfg.url


def _url_cached(url: str) -> bool:
    """Whether torch.hub's cache, where timm keeps URL-hosted weights, holds `url`'s file."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name).is_file()


def hub_unreachable(url: str | None = None) -> str | None:
    """Why `url`'s host (default: the hub) cannot be reached (one TCP connect, at most
    CONNECT_TIMEOUT_S, through the proxy the environment names), or None."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # the user's word for no downloads, from anywhere
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(url or os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxies = urllib.request.getproxies()
    # huggingface_hub's httpx honours ALL_PROXY; torch.hub's urllib does not.
    proxy = proxies.get(endpoint.scheme or "https") or (proxies.get("all") if url is None else None)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or PROXY_DEFAULT_PORTS.get(proxy_url.scheme, 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"cannot connect to {host}:{port}: {error.strerror or type(error).__name__}"
    return None


def _download_errors() -> tuple[type[Exception], ...]:
    """What a failed download raises: OSError (huggingface_hub's HTTP errors, urllib's), and
    what is not one: httpx's errors (a proxy's 403, a read timeout), hf_xet's download error."""
    errors: list[type[Exception]] = [OSError]
    for module_name in ("httpx", "httpx2"):  # huggingface_hub's HTTP client, by version
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module_name).HTTPError)
    xet_error = getattr(huggingface_hub.errors, "XetDownloadError", None)
    return tuple(errors + ([xet_error] if xet_error else []))


def _create_checked(name: str, timm_name: str, **kwargs) -> nn.Module:
    """timm.create_model with its weights; a damaged weights file in a cache is one line."""
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error):
            raise  # not a file timm could not read
        raise UserError(
            f"model '{name}': the cached weights file is damaged ({type(error).__name__}); delete it from the "
            "Hugging Face cache (`hf cache delete`, or its folder under HF_HUB_CACHE) or torch.hub's "
            "checkpoints folder, and run again"
        ) from None


def create_pretrained(name: str, timm_name: str, **kwargs) -> nn.Module:
    """timm.create_model(timm_name, pretrained=True, **kwargs), failing in one line offline."""
    url = _weights_url(timm_name)
    if url is None or _url_cached(url):  # a URL-hosted file not cached would be downloaded here, unchecked
        try:
            with _hub_offline():
                return _create_checked(name, timm_name, **kwargs)
        except OSError:  # not in the cache (LocalEntryNotFoundError)
            pass
    why = hub_unreachable(url)
    source = "the Hugging Face hub" if url is None else urlsplit(url).hostname
    if why is not None:
        problem = f"{source} is unreachable here ({why})"
    else:
        try:
            return _create_checked(name, timm_name, **kwargs)
        except _download_errors() as error:
            first_line = str(error).splitlines()[0] if str(error) else ""
            problem = f"downloading them from {source} failed ({type(error).__name__}: {first_line})"
    raise UserError(
        f"model '{name}': --pretrained needs timm's weights, which are not in the local cache and "
        f"{problem}; download them elsewhere and pass --weights FILE"
    )
