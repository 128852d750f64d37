"""The servers a torchft replica group runs, bound to one address: torchft's manager gRPC server and
its checkpoint HTTP transport (which heals a peer), with the healing bytes counted on the wire and
checkpoints loaded with ``weights_only=True``. torchft 0.2.0 binds both to every interface and
unpickles what a peer sends; these wrap its classes (imported lazily: torchft is an optional
extra) without changing its protocol."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from datetime import timedelta
from http.server import ThreadingHTTPServer
from typing import Any

__all__ = ["CountingReader", "CountingWriter", "bound_http_transport", "manager_server_bound_to", "url_host"]


def url_host(host: str) -> str:
    """``host`` as it goes in a URL or ``host:port`` (IPv6 literals in brackets)."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def manager_server_bound_to(host: str) -> Any:
    """While a ``Manager`` is constructed: its gRPC server binds ``host`` instead of ``[::]``.

    torchft 0.2.0 hard-codes ``bind=f"[::]:{port}"`` inside ``Manager.__init__``; the Rust server
    takes any ``host:port``, so the one constructor call is redirected (under a lock).
    """
    import torchft.manager as tm

    real = tm.ManagerServer

    def bound(*args: Any, **kwargs: Any) -> Any:
        port = str(kwargs.get("bind", ":0")).rsplit(":", 1)[1]
        kwargs["bind"] = f"{url_host(host)}:{port}"
        return real(*args, **kwargs)

    with _PATCH_LOCK:
        tm.ManagerServer = bound
        try:
            yield
        finally:
            tm.ManagerServer = real


class CountingWriter:
    """A binary file's ``write`` that counts the bytes written (the rest passes through)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def write(self, data: Any) -> Any:
        self.count += memoryview(data).nbytes
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class CountingReader:
    """A binary file's ``read``/``readinto``/``readline`` that count the bytes read."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def read(self, *args: Any) -> Any:
        data = self.raw.read(*args)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> Any:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n

    def readline(self, *args: Any) -> Any:
        data = self.raw.readline(*args)
        self.count += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def bound_http_transport(timeout: timedelta, host: str) -> Any:
    """torchft's ``HTTPTransport`` serving on ``host`` (torchft: every interface) and advertising
    ``host`` (torchft: ``socket.gethostname()``), loading checkpoints with ``weights_only=True``."""
    from torchft.checkpointing import HTTPTransport
    from torchft.checkpointing._serialization import _streaming_load

    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]

    class _Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        request_queue_size = 1024

    class BoundHTTPTransport(HTTPTransport):
        _server: Any
        _thread: Any

        def __init__(self) -> None:
            super().__init__(timeout=timeout, num_chunks=0)
            first: Any = self._server  # torchft's, on every interface: replaced at once
            handler = first.RequestHandlerClass
            first.shutdown()
            self._thread.join()
            first.server_close()
            self._served = 0
            self._served_lock = threading.Lock()
            transport = self

            class CountingHandler(handler):  # type: ignore[misc, valid-type]
                """torchft's handler; the bytes of every response body are counted (one per healer)."""

                def do_GET(self) -> None:
                    raw: Any = self.__dict__["wfile"]  # set by the request's setup()
                    counted = CountingWriter(raw)
                    self.wfile = counted
                    try:
                        super().do_GET()
                    finally:
                        self.wfile = raw
                        transport.add_served(counted.count)

            self._server = _Server((host, 0), CountingHandler)
            self._thread = threading.Thread(target=self._serve, daemon=True, name="ft-checkpoint-http")
            self._thread.start()
            #: seconds of the last checkpoint fetched from a peer (HTTP and deserialisation)
            self.last_fetch_seconds: float | None = None
            #: bytes of the last checkpoint fetched from a peer (the response body)
            self.last_fetch_bytes: int | None = None

        def add_served(self, nbytes: int) -> None:
            with self._served_lock:
                self._served += nbytes

        def take_served(self) -> int:
            """Bytes served to healers since the last call."""
            with self._served_lock:
                served, self._served = self._served, 0
            return served

        def address(self) -> str:
            port = self._server.socket.getsockname()[1]
            return f"http://{url_host(host)}:{port}/checkpoint/"

        def _load_from_address(self, address: str, timeout: timedelta) -> object:
            import urllib.request

            t0 = time.perf_counter()
            with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
                counted = CountingReader(f)
                state = _streaming_load(counted, weights_only=True)
            self.last_fetch_seconds = time.perf_counter() - t0
            self.last_fetch_bytes = counted.count
            return state

    return BoundHTTPTransport()
