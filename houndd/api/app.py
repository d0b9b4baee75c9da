"""The aiohttp application: public `/v1` API, the peer endpoint, SSE progress and `/metrics`.

Handlers are thin: they parse input, call the node facade (`NodeApi`), and render JSON. All
errors leave as `application/problem+json`. Authentication: `Authorization: Bearer <token>` with
a token derived from an installed cluster key (or a configured API token) on everything but
`/v1/health`, `/metrics` and `/v1/openapi.json`; `/v1/peer` and `/v1/peer/blob` carry sealed,
signed envelopes and are authenticated by the wire layer instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from houndd import __version__
from houndd.api.openapi import openapi_document
from houndd.api.problems import PROBLEM_TYPE, ProblemError, problem
from houndd.coordinator.views import TooManyStreams
from houndd.errors import (
    HounddError,
    NoCoordinatorError,
    PlanError,
    PlanFinishedError,
    ReplicationError,
)
from houndd.jsondoc import DuplicateKey, unique_pairs
from houndd.names import MAX_LABELS, label_key_problem, label_value_problem

log = logging.getLogger("houndd.api")

OPEN_PATHS = frozenset({"/v1/health", "/metrics", "/v1/openapi.json", "/v1/peer", "/v1/peer/blob"})
SSE_KEEPALIVE_S = 15.0
SSE_WRITE_PIECE = 64 * 1024
"""An event batch is written in pieces of this size, so a reader that does not read holds at
most about two pieces in our buffers (aiohttp waits for the socket beyond 64 KiB)."""
SSE_WRITE_TIMEOUT_S = 30.0
"""A reader that takes longer than this to accept one batch of events is gone: its stream is
closed."""


class NodeApi(Protocol):
    """What the HTTP layer needs from the running node (implemented by the daemon)."""

    def api_tokens(self) -> list[str]: ...
    def health(self) -> dict[str, Any]: ...
    async def node_info(self) -> dict[str, Any]: ...
    def cluster(self) -> dict[str, Any]: ...
    def member(self, name: str) -> dict[str, Any] | None: ...
    async def set_labels(self, name: str, labels: Mapping[str, str | None]) -> dict[str, Any]: ...
    async def keys(self, op: str, key: bytes | None) -> dict[str, Any]: ...
    async def submit_plan(self, body: bytes, content_type: str) -> dict[str, Any]: ...
    async def preview_plan(self, body: bytes, content_type: str) -> dict[str, Any]: ...
    async def plans(self) -> list[dict[str, Any]]: ...
    async def plan(self, plan_id: str) -> dict[str, Any] | None: ...
    async def cancel_plan(self, plan_id: str) -> dict[str, Any] | None: ...
    def plan_events(self, plan_id: str) -> AsyncGenerator[bytes, None]: ...
    async def peer(self, data: bytes, source: str | None) -> bytes: ...
    async def peer_blob(self, request: web.Request) -> web.StreamResponse: ...
    def metrics_text(self) -> tuple[bytes, str]: ...


NODE: web.AppKey[NodeApi] = web.AppKey("node", NodeApi)


# --- middlewares ---------------------------------------------------------------------------


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error becomes problem+json; unexpected ones are logged and answered 500."""
    try:
        return await handler(request)
    except ProblemError as e:
        return e.response()
    except PlanError as e:
        return problem(400, "invalid plan", e.reason, field=e.field)
    except NoCoordinatorError as e:
        return problem(503, "no coordinator", str(e), headers={"Retry-After": "2"})
    except TooManyStreams as e:
        return problem(503, "too many event streams", str(e), headers={"Retry-After": "2"})
    except ReplicationError as e:
        return problem(503, "plan not replicated", str(e), headers={"Retry-After": "2"})
    except web.HTTPRequestEntityTooLarge:
        return problem(
            413, "request body too large", "the body exceeds max_http_body_bytes", field="body"
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return problem(e.status, e.reason, e.text if e.text and e.text != e.reason else "")
    except HounddError as e:
        status, title = _status_of(e)
        return problem(status, title, str(e))


def _status_of(e: HounddError) -> tuple[int, str]:
    """HTTP status and a title for the user (never a Python class name), from the built-in
    exception the error also is."""
    if isinstance(e, ValueError):
        return 400, "invalid request"
    if isinstance(e, LookupError):
        return 404, "not found"
    if isinstance(e, ConnectionError):
        return 502, "peer unreachable"
    if isinstance(e, TimeoutError):
        return 504, "timed out"
    return 409, "conflict"


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's request handler writes to.

    A request aiohttp cannot parse (a control character in a header, a bad request line) is the
    client's fault: one warning line naming the kind of error, never the offending bytes, which
    can hold a bearer token. Anything else is a bug and keeps its traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            remote = args[0] if args else "?"
            self.logger.warning(
                "bad http request remote=%s status=%s error=%s",
                remote, exc.code, _parse_error_kind(exc),
            )  # fmt: skip
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kw)


def _parse_error_kind(exc: HttpProcessingError) -> str:
    """What went wrong, without the request bytes aiohttp quotes after it."""
    first = str(exc.message or type(exc).__name__).split("\n", 1)[0]
    for stop in (":", "'", '"', "b'"):
        first = first.split(stop, 1)[0]
    return first.strip()[:80] or type(exc).__name__


def auth_middleware_factory() -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def auth_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ProblemError(
                401,
                "unauthorized",
                "send Authorization: Bearer <token> (the CLI derives it from the cluster key)",
                headers={"WWW-Authenticate": 'Bearer realm="houndd"'},
            )
        node = request.app[NODE]
        # Compared as bytes: a header may hold any character (aiohttp decodes it with
        # surrogateescape), and compare_digest refuses non-ASCII str.
        offered = token.encode("utf-8", "surrogateescape")
        if not any(hmac.compare_digest(offered, t.encode()) for t in node.api_tokens()):
            log.debug("api unauthorized remote=%s path=%s", request.remote, request.path)
            raise ProblemError(
                401,
                "unauthorized",
                "the bearer token matches no installed cluster key or API token",
                headers={"WWW-Authenticate": 'Bearer realm="houndd"'},
            )
        return await handler(request)

    return auth_middleware


# --- handlers --------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"null", object_pairs_hook=unique_pairs)
    except DuplicateKey as e:
        raise ProblemError(400, "invalid JSON", str(e), field=str(e.key)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProblemError(400, "invalid JSON", str(e), field="body") from None
    except RecursionError:
        raise ProblemError(400, "invalid JSON", "nested too deeply", field="body") from None
    if not isinstance(body, dict):
        raise ProblemError(400, "invalid body", "expected a JSON object", field="body")
    return body


async def health(request: web.Request) -> web.Response:
    return _json(request.app[NODE].health())


async def node_info(request: web.Request) -> web.Response:
    return _json(await request.app[NODE].node_info())


async def cluster(request: web.Request) -> web.Response:
    return _json(request.app[NODE].cluster())


async def node_get(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    member = request.app[NODE].member(name)
    if member is None:
        raise ProblemError(404, "unknown node", f"no member named {name!r}", field="name")
    return _json(member)


async def node_labels(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await _read_json_object(request)
    unknown = set(body) - {"labels"}
    if unknown:
        raise ProblemError(400, "invalid body", "unknown field", field=sorted(unknown)[0])
    labels = body.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ProblemError(400, "invalid body", "expected a non-empty object", field="labels")
    if len(labels) > MAX_LABELS:
        raise ProblemError(
            400, "invalid body", f"a node carries at most {MAX_LABELS} labels", field="labels"
        )
    for k, v in labels.items():
        if label_key_problem(k):
            raise ProblemError(400, "invalid label", f"bad label key {k!r}", field=f"labels.{k}")
        if v is not None and (not isinstance(v, str) or label_value_problem(v)):
            raise ProblemError(
                400, "invalid label", "a value is a string (<= 253) or null", field=f"labels.{k}"
            )
    if request.app[NODE].member(name) is None:
        raise ProblemError(404, "unknown node", f"no member named {name!r}", field="name")
    return _json(await request.app[NODE].set_labels(name, labels))


async def keys_list(request: web.Request) -> web.Response:
    return _json(await request.app[NODE].keys("list", None))


async def keys_op(request: web.Request) -> web.Response:
    body = await _read_json_object(request)
    unknown = set(body) - {"op", "key"}
    if unknown:
        raise ProblemError(400, "invalid body", "unknown field", field=sorted(unknown)[0])
    op = body.get("op")
    if op not in ("install", "use", "remove"):
        raise ProblemError(400, "invalid body", "op is install, use or remove", field="op")
    raw = body.get("key")
    try:
        key = base64.b64decode(str(raw), validate=True)
    except (binascii.Error, ValueError):
        raise ProblemError(400, "invalid key", "expected base64", field="key") from None
    if len(key) != 32:
        raise ProblemError(400, "invalid key", "a cluster key is 32 bytes", field="key")
    return _json(await request.app[NODE].keys(op, key))


_DRY_RUN = {"true": True, "1": True, "false": False, "0": False}


async def plan_submit(request: web.Request) -> web.Response:
    dry_run = _DRY_RUN.get(request.query.get("dry_run", "false").lower())
    if dry_run is None:
        raise ProblemError(400, "invalid request", "dry_run is true or false", field="dry_run")
    body = await request.read()
    if not body.strip():
        raise ProblemError(400, "invalid plan", "empty body", field="body")
    if dry_run:
        return _json(await request.app[NODE].preview_plan(body, request.content_type))
    result = await request.app[NODE].submit_plan(body, request.content_type)
    return _json(result, status=201)


async def plan_list(request: web.Request) -> web.Response:
    return _json({"plans": await request.app[NODE].plans()})


async def _plan_or_404(request: web.Request) -> tuple[str, dict[str, Any]]:
    plan_id = request.match_info["plan_id"]
    plan = await request.app[NODE].plan(plan_id)
    if plan is None:
        raise ProblemError(404, "unknown plan", f"no plan {plan_id!r}", field="plan_id")
    return plan_id, plan


async def plan_get(request: web.Request) -> web.Response:
    return _json((await _plan_or_404(request))[1])


async def plan_cancel(request: web.Request) -> web.Response:
    plan_id, _ = await _plan_or_404(request)
    try:
        result = await request.app[NODE].cancel_plan(plan_id)
    except PlanFinishedError as e:
        raise ProblemError(409, "plan finished", str(e), field="plan_id", state=e.state) from None
    return _json(result)


async def plan_events(request: web.Request) -> web.StreamResponse:
    events = request.app[NODE].plan_events(request.match_info["plan_id"])
    try:
        first = await anext(events)  # a plan no node knows, or a full node, fails here
    except StopAsyncIteration:
        plan_id = request.match_info["plan_id"]
        raise ProblemError(404, "unknown plan", f"no plan {plan_id!r}", field="plan_id") from None
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await resp.prepare(request)
        chunk: bytes | None = first
        while chunk is not None:
            await _write_pieces(resp, chunk)
            try:
                # asyncio.timeout, not wait_for: wait_for starts a task per call, and with a
                # thousand readers that was a large part of the coordinator's time.
                async with asyncio.timeout(SSE_KEEPALIVE_S):
                    chunk = await anext(events)
            except TimeoutError:
                chunk = b": keepalive\n\n"
            except StopAsyncIteration:
                chunk = None
    except ConnectionResetError:
        pass  # the client went away; the stream is ours to end (a cancellation propagates)
    except TimeoutError:
        log.info("event stream reader too slow; closed remote=%s", request.remote)
    finally:
        await events.aclose()
    return resp


async def _write_pieces(resp: web.StreamResponse, chunk: bytes) -> None:
    # Slices of one shared batch: no reader gets a copy of what it has not been sent yet.
    # One deadline for the batch (a timer per piece and reader cost more than the writes).
    view = memoryview(chunk)
    async with asyncio.timeout(SSE_WRITE_TIMEOUT_S):
        for start in range(0, len(view), SSE_WRITE_PIECE):
            await resp.write(view[start : start + SSE_WRITE_PIECE])


async def peer(request: web.Request) -> web.Response:
    data = await request.read()
    reply = await request.app[NODE].peer(data, request.remote)
    return web.Response(body=reply, content_type="application/octet-stream")


async def peer_blob(request: web.Request) -> web.StreamResponse:
    return await request.app[NODE].peer_blob(request)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[NODE].metrics_text()
    # prometheus-client's content type carries a charset; aiohttp wants them apart
    ctype, _, params = content_type.partition(";")
    charset = params.partition("charset=")[2].strip() or None
    return web.Response(body=body, content_type=ctype.strip(), charset=charset)


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document(__version__))


def make_app(node: NodeApi, *, max_body_bytes: int) -> web.Application:
    """Build the application. The daemon owns its lifecycle (AppRunner + site)."""
    app = web.Application(
        middlewares=[problem_middleware, auth_middleware_factory()],
        client_max_size=max_body_bytes,
        handler_args={"logger": ServerLog(logging.getLogger("houndd.api.server"), {})},
    )
    app[NODE] = node
    r = app.router
    r.add_get("/v1/health", health)
    r.add_get("/v1/node", node_info)
    r.add_get("/v1/cluster", cluster)
    r.add_get("/v1/nodes/{name}", node_get)
    r.add_put("/v1/nodes/{name}/labels", node_labels)
    r.add_get("/v1/keys", keys_list)
    r.add_post("/v1/keys", keys_op)
    r.add_post("/v1/plans", plan_submit)
    r.add_get("/v1/plans", plan_list)
    r.add_get("/v1/plans/{plan_id}", plan_get)
    r.add_delete("/v1/plans/{plan_id}", plan_cancel)
    r.add_get("/v1/plans/{plan_id}/events", plan_events)
    r.add_post("/v1/peer", peer)
    r.add_post("/v1/peer/blob", peer_blob)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/openapi.json", openapi)
    return app


__all__ = ["NODE", "PROBLEM_TYPE", "NodeApi", "make_app"]
