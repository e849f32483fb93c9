"""Run the app under uvicorn: one process holding the index, or `workers` processes each loading it."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import replace

import uvicorn
from uvicorn.supervisors import Multiprocess

from vpr.api import check_index
from vpr.errors import OutputError
from vpr.serve.app import create_app
from vpr.serve.config import ServeConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def trusted_hosts(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host headers a server bound to `host` answers besides the loopback names: `host` itself, or
    for every interface (0.0.0.0, ::) this machine's names and addresses; `extra` adds names it is reached by."""
    names = list(extra)
    if host in ("0.0.0.0", "::", ""):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.append(name)
            try:
                names.extend(socket.gethostbyname_ex(name)[2])
            except OSError:
                pass
    else:
        names.append(host)
    return tuple(dict.fromkeys(name for name in names if name))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port`, or a one-line `OutputError` (the host does not resolve, the
    port is taken or not allowed): uvicorn would exit 3 with its own log instead."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise OutputError(f"host {host}: does not resolve to an address of this machine ({exc}); give an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
        raise OutputError(f"port {port} on {host}: {reason}; choose another port") from None
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info", on_ready: Callable[[dict], None] | None = None) -> None:
    """Serve until interrupted. The index is loaded (and validated) and the port bound before uvicorn
    starts; with `workers` > 1 each worker process loads its own copy. `on_ready(manifest)` runs once both
    succeeded, before the first request is taken."""
    config = replace(config, allowed_hosts=trusted_hosts(host, config.allowed_hosts))
    if workers == 1:
        app = create_app(config)
        with bind(host, port) as sock:
            if on_ready is not None:
                on_ready(check_index(config.index))
            uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
        return
    manifest = check_index(config.index)  # a bad index fails here, once, rather than in every worker
    config.to_env()
    with bind(host, port) as sock:
        if on_ready is not None:
            on_ready(manifest)
        server_config = uvicorn.Config("vpr.serve.app:app_from_env", factory=True, workers=workers, log_level=log_level)
        Multiprocess(server_config, sockets=[sock]).run()
