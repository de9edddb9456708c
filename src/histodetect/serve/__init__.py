"""`histodetect serve`: a web page for people and a REST API for programs, on one batched model.

    serve_run(run_dir, host="127.0.0.1", port=8000, config=ServeConfig())

`create_app(run, config)` builds the FastAPI app (app.py) for tests and other
ASGI servers; request limits and decoding live in inputs.py, request batching
in batcher.py, the page in static/.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import Interrupted, UserError, install_handlers, restore_handlers
from .app import create_app
from .inputs import RequestError, ServeConfig

__all__ = ["RequestError", "ServeConfig", "create_app", "serve_run"]


def _is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.0/8, ::1, localhost): no warning then."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _serve_url(host: str, port: int) -> str:
    """The address to open; an IPv6 host goes in brackets (http://[::1]:8000/)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _bind_fix(error: OSError, port: int) -> str:
    """What to do about a failed bind, by its cause."""
    if error.errno == errno.EADDRNOTAVAIL:
        return "not an address of this machine; use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    if error.errno == errno.EACCES and port < 1024:
        return "ports below 1024 need administrator rights; choose one above 1023 with --port"
    if error.errno == errno.EADDRINUSE:
        return "another server holds the port? choose another with --port"
    return "choose another --host or --port"


def _check_port_free(host: str, port: int) -> None:
    """A busy port or an unknown host is one line before the model loads (uvicorn logs it and exits 3)."""
    # Port 0 would make uvicorn pick a free port, but the address printed before it binds would say :0.
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: expected a port number in 1-65535 (e.g. 8000)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, OverflowError) as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
                            f"{_bind_fix(exc, port)}") from None


def serve_run(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
              device: str = "auto", threads: int = 0, access_log: bool = True, fp32: bool = False) -> None:
    """Load a run and serve it with uvicorn until interrupted (one process, one model, batched)."""
    import uvicorn

    from ..predict import load_run

    _check_port_free(host, port)
    run = load_run(Path(run_dir), device=device, threads=threads, fp32=fp32)
    app = create_app(run, config or ServeConfig())
    if not _is_loopback(host):
        warnings.warn(f"--host {host}: serving beyond this machine, without authentication or TLS; "
                      "put it behind a proxy that adds them", stacklevel=2)
    print(f"histodetect: serving {run_dir} on {_serve_url(host, port)} (API docs at /docs); Ctrl-C stops")
    with _noting_stop_signals() as stopped_by:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)
    if stopped_by:
        raise Interrupted("", stopped_by[0])


@contextlib.contextmanager
def _noting_stop_signals() -> Iterator[list[int]]:
    """Note the SIGINT or SIGTERM that stopped uvicorn, so that serve ends as every command does (exit 130
    or 143; a notebook's "interrupt the kernel" as always). uvicorn shuts down on either, then raises it
    again into the handlers from before; uvicorn.run itself catches the KeyboardInterrupt that raises,
    and `histodetect serve` stopped by Ctrl-C or a scheduler's SIGTERM exited 0."""
    noted: list[int] = []
    replaced = install_handlers(lambda number, frame: noted.append(number))
    try:
        yield noted
    finally:
        restore_handlers(replaced)
