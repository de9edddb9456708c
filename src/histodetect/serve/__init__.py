"""`histodetect serve`: a web page for people and a REST API for programs, on one batched model.

    serve_run(run_dir, host="127.0.0.1", port=8000, config=ServeConfig())

`create_app(run, config)` builds the FastAPI app (app.py) for tests and other
ASGI servers; request limits and decoding live in inputs.py, request batching
in batcher.py, the page in static/.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

from ..errors import UserError
from .app import create_app
from .inputs import RequestError, ServeConfig

__all__ = ["RequestError", "ServeConfig", "create_app", "serve_run"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_port_free(host: str, port: int) -> None:
    """A busy port or an unknown host is one line before the model loads (uvicorn logs it and exits 3)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected a port number in 0-65535 (e.g. 8000)")
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
                            "another server holds the port? choose another with --port") from None


def serve_run(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
              device: str = "auto", threads: int = 0, access_log: bool = True, fp32: bool = False) -> None:
    """Load a run and serve it with uvicorn until interrupted (one process, one model, batched)."""
    import uvicorn

    from ..predict import load_run

    _check_port_free(host, port)
    run = load_run(Path(run_dir), device=device, threads=threads, fp32=fp32)
    app = create_app(run, config or ServeConfig())
    if host not in LOOPBACK_HOSTS:
        warnings.warn(f"--host {host}: serving beyond this machine, without authentication or TLS; "
                      "put it behind a proxy that adds them", stacklevel=2)
    print(f"histodetect: serving {run_dir} on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)
