"""HTTP client for the houndd API, used by the CLI (and by tests and benchmarks)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from houndd.errors import HounddError


class ApiError(HounddError):
    """The API answered with a problem; `status`, `title`, `detail`, `field` come from it."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.title = str(body.get("title", "error"))
        self.detail = str(body.get("detail", ""))
        self.field = body.get("field")
        where = f" (field {self.field})" if self.field else ""
        super().__init__(f"HTTP {status} {self.title}{where}: {self.detail}".rstrip(": "))
        self.body = dict(body)


class Unreachable(HounddError, ConnectionError):
    """The daemon's API did not answer."""


class Client:
    """`async with Client(api, token) as c: await c.get("/v1/cluster")`."""

    def __init__(self, api: str, token: str | None, *, timeout_s: float = 30.0) -> None:
        self.api = api.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use Client as an async context manager")
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Content-Type": content_type} if content_type else None
        try:
            async with self.session.request(
                method, self.api + path, json=json_body, data=data, headers=headers
            ) as resp:
                text = await resp.text()
                body: Any = json.loads(text) if text else {}
                if resp.status >= 400:
                    raise ApiError(resp.status, body if isinstance(body, dict) else {})
                return body
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise Unreachable(f"cannot reach the houndd API at {self.api}: {e}") from None
        except json.JSONDecodeError:
            raise HounddError(f"{self.api}{path} answered something that is not JSON") from None

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def events(self, plan_id: str) -> AsyncIterator[dict[str, Any]]:
        """Server-sent events of a plan, decoded; ends when the plan is final."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        try:
            async with self.session.get(
                f"{self.api}/v1/plans/{plan_id}/events", timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise ApiError(resp.status, json.loads(await resp.text() or "{}"))
                data_lines: list[str] = []
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n").rstrip("\r")
                    if line.startswith("data:"):
                        data_lines.append(line[5:].strip())
                    elif not line and data_lines:
                        yield json.loads("\n".join(data_lines))
                        data_lines = []
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise Unreachable(f"lost the event stream from {self.api}: {e}") from None
