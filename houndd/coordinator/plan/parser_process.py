"""`PlanParser`: plan text parsed in a child process, within a time budget.

Parsing is the one step of a submission whose cost the client controls: a 1 MiB YAML document
of tiny flow-style scalars keeps pure-Python PyYAML busy for over ten seconds, and even
libyaml's composer (`CSafeLoader`) holds the GIL for seconds at a time in a single call, so a
worker thread would still freeze the event loop, and with it gossip, heartbeats and every
election timer. The text therefore goes to a child process (`python -m` this module), which
parses and validates it (`parse_plan`) and answers with the canonical plan document; the
daemon rebuilds the `PlanSpec` from that document, which is bounded by the plan's caps.

Bounds: a parse that takes longer than the budget (`plan_parse_timeout_s`) is refused as an
invalid plan and the child is killed (the next parse starts a fresh one); the child's address
space is capped (PARSER_MEMORY_BYTES), so a document that would need more fails inside it.
One child serves one parse at a time; the daemon starts it at startup (`start`; about 22 MB
resident), a parse restarts it if it is gone, and it exits when its stdin closes (the daemon
stopped or died).

Frames on the pipes: request `!IB` (body length, format: 0 guess, 1 yaml, 2 json) + body;
reply `!I` + JSON, `{"plan": document}` (with its `auth` when it has credentials) or
`{"error": [field, reason]}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import sys
from typing import Any, BinaryIO

from houndd.coordinator.plan.loading import PlanFormat, parse_plan
from houndd.coordinator.plan.model import MAX_DOCUMENT_BYTES, PlanSpec
from houndd.coordinator.plan.validation import validate_plan
from houndd.errors import PlanError

__all__ = ["PARSER_MEMORY_BYTES", "PlanParser", "serve"]

log = logging.getLogger("houndd.coordinator")

PARSER_MEMORY_BYTES = 1 << 30
"""Address space of the child. The worst 1 MiB document (half a million one-character flow
scalars) peaks near 200 MiB; the cap only stops what no plan needs."""
MAX_REPLY_BYTES = 64 << 20
"""A parsed plan is bounded by its caps (20,000 images, 20,000 node names); its JSON is a few
MiB at most."""
CHILD_GRACE_S = 10.0
"""Beyond the parse budget: the longest a parse waits for the parser to be free, for a child
to start or for a killed child to be reaped."""
_REQUEST = struct.Struct("!IB")
_REPLY = struct.Struct("!I")
_FORMAT_CODES: dict[PlanFormat | None, int] = {None: 0, "yaml": 1, "json": 2}
_FORMATS = {code: fmt for fmt, code in _FORMAT_CODES.items()}


class PlanParser:
    """Parses plan text in a child process. Constructor does no IO; `close()` is idempotent."""

    def __init__(self, budget_s: float, *, python: str = sys.executable) -> None:
        self._budget_s = budget_s
        self._python = python
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None

    async def parse(self, body: bytes, fmt: PlanFormat | None = None) -> PlanSpec:
        """The validated plan; `PlanError(field, reason)` for anything wrong with the text,
        including a parse that outlasts the budget."""
        if len(body) > MAX_DOCUMENT_BYTES:
            raise PlanError("document", f"larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            # Every wait is bounded: the exchange by the budget, and the queue for the
            # parser, starting a child and stopping one by this outer deadline, so a child
            # that never starts or never dies cannot hold a submission for ever.
            async with asyncio.timeout(self._budget_s + CHILD_GRACE_S):
                async with self._lock:
                    raw = await self._exchange(body, fmt)
        except TimeoutError:
            log.warning("plan parser did not answer bytes=%d", len(body))
            # Kill it without waiting (reaping it is what may hang); the next parse starts a
            # fresh child.
            proc, self._proc = self._proc, None
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise PlanError(
                "document", "the plan parser did not answer in time; retry the submission"
            ) from None
        reply = json.loads(raw)
        if "error" in reply:
            field, reason = reply["error"]
            raise PlanError(str(field), str(reason))
        return validate_plan(reply["plan"])

    async def start(self) -> None:
        """Start the child now rather than on the first parse: a Python start (0.1-0.3 s) is
        otherwise paid by the first plan after the daemon starts, twice when it is forwarded
        (the receiving node and the coordinator each parse). Idempotent; TimeoutError if the
        child could not be started within CHILD_GRACE_S."""
        async with asyncio.timeout(CHILD_GRACE_S), self._lock:
            await self._child()

    async def close(self) -> None:
        """Stop the child, if one runs."""
        await self._stop()

    async def _exchange(self, body: bytes, fmt: PlanFormat | None) -> bytes:
        proc = await self._child()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async with asyncio.timeout(self._budget_s):
                proc.stdin.write(_REQUEST.pack(len(body), _FORMAT_CODES[fmt]) + body)
                await proc.stdin.drain()
                (size,) = _REPLY.unpack(await proc.stdout.readexactly(_REPLY.size))
                if size > MAX_REPLY_BYTES:
                    await self._stop()
                    raise PlanError("document", "too large once parsed")
                return await proc.stdout.readexactly(size)
        except TimeoutError:
            await self._stop()
            log.warning("plan parse over budget budget_s=%s bytes=%d", self._budget_s, len(body))
            raise PlanError(
                "document", f"took longer than {self._budget_s:g} s to parse; simplify the plan"
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            await self._stop()
            log.warning("plan parser stopped bytes=%d error=%s", len(body), type(e).__name__)
            raise PlanError(
                "document", "could not be parsed (the parser ran out of memory)"
            ) from None

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                __name__,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        return self._proc

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CHILD_GRACE_S):
                await proc.wait()


# --- the child ---------------------------------------------------------------------------------


def _limit_memory(limit: int) -> None:
    import resource

    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _answer(body: bytes, fmt: PlanFormat | None) -> dict[str, Any]:
    try:
        spec = parse_plan(body, fmt=fmt)
    except PlanError as e:
        return {"error": [e.field, e.reason]}
    except MemoryError:
        return {"error": ["document", "too large to parse"]}
    document = spec.to_document()
    if spec.credentials:
        document["auth"] = spec.credentials_document()
    return {"plan": document}


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The child's loop: one request, one reply, until stdin closes."""
    _limit_memory(PARSER_MEMORY_BYTES)
    while True:
        head = _read_exactly(stdin, _REQUEST.size)
        if head is None:
            return
        size, code = _REQUEST.unpack(head)
        body = _read_exactly(stdin, size)
        if body is None or code not in _FORMATS:
            return
        data = json.dumps(_answer(body, _FORMATS[code]), separators=(",", ":")).encode()
        stdout.write(_REPLY.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
