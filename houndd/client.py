"""HTTP client for the houndd API, used by the CLI (and by tests and benchmarks).

Standard library only, and not even `http.client`: that module loads the `email` package, which
alone costs more start-up time than the rest of `houndd status`. A CLI call makes one or two
requests, each on its own connection (`Connection: close`), so the client needs little: write
the request, read the status line and headers, read a body by Content-Length, chunks or EOF.
Server-sent events are read the same way, line by line as they arrive.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from houndd import __version__
from houndd.errors import HounddError

DEFAULT_PORT = 7480
# Bounds on what a server (or something else listening on the port) can make the CLI hold.
MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 256 << 20
# A plan event stream sends a keepalive every 15 s; silence for this long means it is gone.
EVENT_READ_TIMEOUT_S = 60.0


class ApiError(HounddError):
    """The API answered with a problem; `status`, `title`, `detail`, `field` come from it."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.title = str(body.get("title") or f"HTTP {status}")
        self.detail = str(body.get("detail") or "")
        self.field = body.get("field")
        where = f" (field {self.field})" if self.field else ""
        text = f"{self.title}{where}: {self.detail}" if self.detail else f"{self.title}{where}"
        super().__init__(text)
        self.body = dict(body)


class Unreachable(HounddError, ConnectionError):
    """The daemon's API did not answer."""


class BadApiAddress(HounddError, ValueError):
    """`--api` (or HOUNDD_API) is not an address of a houndd API."""


@dataclass(frozen=True)
class ApiAddress:
    """Where a houndd API listens: `http[s]://host:port`, plus a path prefix (a proxy's)."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def parse_api(text: str) -> ApiAddress:
    """Parse `--api`: `host`, `host:port`, `http://host:port`, `https://host:port/prefix`.

    A trailing `/v1` is dropped (every API path starts with it); a missing port is 7480.
    """
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise BadApiAddress(
            f"--api {text!r}: expected http://HOST:PORT or https://HOST:PORT, not {scheme}://"
        )
    hostport, slash, path = rest.partition("/")
    prefix = ("/" + path).rstrip("/") if slash else ""
    if prefix.endswith("/v1"):
        prefix = prefix[: -len("/v1")]
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host, port_text = hostport, ""
    if not host or any(c.isspace() or c in "@?#" for c in host):
        raise BadApiAddress(f"--api {text!r}: expected a host name or address")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise BadApiAddress(f"--api {text!r}: the port must be a number 1..65535")
    return ApiAddress(scheme, host, int(port_text) if port_text else DEFAULT_PORT, prefix)


class _Response:
    """Status, headers and a body read incrementally from one connection."""

    def __init__(self, sock: socket.socket, address: ApiAddress) -> None:
        self._sock = sock
        self._address = address
        self._buf = b""
        self._eof = False
        line = self._line(MAX_HEADER_BYTES)
        parts = line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise Unreachable(
                f"{address.url} did not answer like an HTTP server"
                + (" (is it an https:// API?)" if address.scheme == "http" else "")
            )
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        size = 0
        while True:
            line = self._line(MAX_HEADER_BYTES)
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise HounddError(f"{address.url} sent more than {MAX_HEADER_BYTES} header bytes")
            if not line.strip():
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._left: int | None = int(length) if length and length.isdigit() else None
        self._chunk_left = 0
        self._after_chunk = False
        self._body_done = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._sock.recv(65536)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _line(self, limit: int) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > limit:
                raise HounddError(f"{self._address.url} sent a line over {limit} bytes")
            if not self._fill():
                if not self._buf:
                    raise ConnectionResetError("connection closed")
                break
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives (chunked, by length, or until the server
        closes); None at its end. A socket timeout leaves the state intact: call again."""
        if self._chunked:
            return self._next_chunked()
        if self._left is not None:
            if self._left <= 0:
                return None
            if not self._buf and not self._fill():
                raise ConnectionResetError("connection closed in the middle of the body")
            data, self._buf = self._buf[: self._left], self._buf[self._left :]
            self._left -= len(data)
            return data
        if not self._buf and not self._fill():
            return None
        data, self._buf = self._buf, b""
        return data

    def _next_chunked(self) -> bytes | None:
        if self._chunk_left == 0:
            if self._body_done:
                return None
            if self._after_chunk:
                if self._line(16):  # the CRLF that ends every chunk's data
                    raise HounddError(f"{self._address.url} sent a malformed chunk")
                self._after_chunk = False
            size_text = self._line(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HounddError(f"{self._address.url} sent a malformed chunk") from None
            if size == 0:
                self._body_done = True
                return None
            self._chunk_left = size
        if not self._buf and not self._fill():
            raise ConnectionResetError("connection closed in the middle of a chunk")
        data, self._buf = self._buf[: self._chunk_left], self._buf[self._chunk_left :]
        self._chunk_left -= len(data)
        self._after_chunk = self._chunk_left == 0
        return data

    def read(self) -> bytes:
        body = b""
        while (chunk := self.next_chunk()) is not None:
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise HounddError(f"{self._address.url} sent a body over {MAX_BODY_BYTES} bytes")
        return body


class Client:
    """`with Client(api, token) as c: c.get("/v1/cluster")`; one connection per request."""

    def __init__(
        self,
        api: str | ApiAddress,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        unauthorized_hint: str | None = None,
    ) -> None:
        self.address = api if isinstance(api, ApiAddress) else parse_api(api)
        self.api = self.address.url
        self._token = token
        self._unauthorized_hint = unauthorized_hint
        self._timeout_s = timeout_s
        self._socks: list[socket.socket] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection still open (an event stream being read). Idempotent."""
        for sock in self._socks:
            sock.close()
        self._socks.clear()

    def _connect(self, timeout_s: float) -> socket.socket:
        a = self.address
        # an ASCII name goes as bytes: a str would load the idna codec on every call (CPython
        # takes bytes hosts; typeshed types the host as str only, hence the ignore below)
        host: str | bytes = a.host.encode() if a.host.isascii() else a.host
        try:
            sock = socket.create_connection((host, a.port), timeout=timeout_s)  # type: ignore[arg-type]
        except socket.gaierror as e:
            raise Unreachable(
                f"cannot resolve {a.host!r} ({e.strerror}); check --api or HOUNDD_API"
            ) from None
        except OSError as e:
            raise Unreachable(_unreachable_text(a, e)) from None
        if a.scheme == "https":
            import ssl  # only https pays for it

            context = ssl.create_default_context()
            if os.environ.get("HOUNDD_CA_FILE"):
                context.load_verify_locations(os.environ["HOUNDD_CA_FILE"])
            try:
                sock = context.wrap_socket(sock, server_hostname=a.host)
            except ssl.SSLError as e:
                sock.close()
                hint = ""
                if "WRONG_VERSION_NUMBER" in str(e):
                    hint = "; the API answers in plain HTTP: use http:// in --api"
                raise Unreachable(f"TLS with {a.url} failed: {e.reason or e}{hint}") from None
            except OSError as e:
                sock.close()
                raise Unreachable(_unreachable_text(a, e)) from None
        self._socks.append(sock)
        return sock

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
        *,
        timeout_s: float,
        accept: str = "application/json",
    ) -> _Response:
        a = self.address
        host = f"[{a.host}]" if ":" in a.host else a.host
        lines = [
            f"{method} {a.prefix}{path} HTTP/1.1",
            f"Host: {host}:{a.port}",
            f"User-Agent: houndd-cli/{__version__}",
            f"Accept: {accept}",
            "Connection: close",
        ]
        if self._token:
            lines.append(f"Authorization: Bearer {self._token}")
        if body is not None:
            lines.append(f"Content-Type: {content_type or 'application/octet-stream'}")
        lines.append(f"Content-Length: {len(body) if body is not None else 0}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sock = self._connect(timeout_s)
        try:
            sock.sendall(head + (body or b""))
            return _Response(sock, a)
        except TimeoutError:
            raise Unreachable(
                f"{a.url} accepted the connection but did not answer within {timeout_s:.0f} s"
            ) from None
        except OSError as e:
            raise Unreachable(_unreachable_text(a, e)) from None

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """One request; the decoded JSON answer, or ApiError for a 4xx/5xx problem."""
        if json_body is not None:
            data, content_type = json.dumps(json_body).encode(), "application/json"
        resp = self._send(method, path, data, content_type, timeout_s=self._timeout_s)
        try:
            raw = resp.read()
        except TimeoutError:
            raise Unreachable(f"{self.api} stopped answering in the middle of a reply") from None
        except OSError as e:
            raise Unreachable(_unreachable_text(self.address, e)) from None
        try:
            body: Any = json.loads(raw) if raw.strip() else {}
        except ValueError:
            if resp.status >= 400:
                text = raw.decode("utf-8", "replace").strip().splitlines()
                raise ApiError(resp.status, {"detail": text[0][:200] if text else ""}) from None
            raise HounddError(f"{self.api}{path} answered something that is not JSON") from None
        if resp.status >= 400:
            raise self._problem(resp.status, body)
        return body

    def _problem(self, status: int, body: Any) -> ApiError:
        problem = dict(body) if isinstance(body, dict) else {}
        if status == 401 and self._unauthorized_hint:
            problem["detail"] = self._unauthorized_hint
        return ApiError(status, problem)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def events(
        self, plan_id: str, *, read_timeout_s: float = EVENT_READ_TIMEOUT_S
    ) -> Iterator[dict[str, Any] | None]:
        """Server-sent events of a plan, decoded, until the stream ends.

        Yields None when nothing arrived for `read_timeout_s` (the caller may refresh its view
        and keep reading); raises Unreachable when the connection is lost.
        """
        resp = self._send(
            "GET",
            f"/v1/plans/{plan_id}/events",
            None,
            None,
            timeout_s=self._timeout_s,
            accept="text/event-stream",
        )
        if resp.status >= 400:
            raw = resp.read()
            try:
                problem = json.loads(raw)
            except ValueError:
                problem = {}
            raise self._problem(resp.status, problem)
        sock = self._socks[-1]
        sock.settimeout(read_timeout_s)
        try:
            yield from self._event_lines(resp)
        finally:
            sock.close()
            self._socks.remove(sock)

    def _event_lines(self, resp: _Response) -> Iterator[dict[str, Any] | None]:
        pending = b""
        data_lines: list[str] = []
        while True:
            try:
                chunk = resp.next_chunk()
                if chunk is None:
                    return
            except TimeoutError:
                yield None
                continue
            except OSError as e:
                raise Unreachable(f"lost the event stream from {self.api}: {e}") from None
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw_line in lines:
                line = raw_line.decode("utf-8", "replace").rstrip("\r")
                if line.startswith("data:"):
                    data_lines.append(line[5:].strip())
                elif not line and data_lines:
                    text, data_lines = "\n".join(data_lines), []
                    try:
                        event = json.loads(text)
                    except ValueError:
                        continue  # not ours to interpret; the next view carries full state
                    yield event


def _unreachable_text(a: ApiAddress, e: OSError) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    if isinstance(e, TimeoutError):
        reason = "timed out"
    return (
        f"cannot reach the houndd API at {a.url} ({reason.lower()}): is houndd running there "
        f"(`systemctl status houndd`)? Point the CLI at any node with --api http://HOST:PORT "
        f"or HOUNDD_API."
    )
