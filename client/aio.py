"""The asynchronous client: `AsyncClient`, `AsyncFunction`, `AsyncInvocation`, the
same API as thaw.client.sync with coroutines and async iterators."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from thaw.client import retry as retries
from thaw.client.credentials import credentials, gateway_url
from thaw.client.errors import ResultTimeout, ThawError, Unavailable, error_from
from thaw.client.protocol import (
    ASYNC_HEADERS,
    DEPLOY_TIMEOUT,
    ChunkedDeploy,
    accepted_id,
    decoded,
    pack,
    result_timeout,
    stream_headers,
    wait_header,
)
from thaw.client.retry import RetryPolicy
from thaw.client.sse import SSE_TYPE, EventReader


class AsyncClient:
    """As thaw.client.Client, for asyncio code."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = (url or gateway_url()).rstrip("/")
        self._key = key
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key or credentials().key}", **(extra or {})}

    def _unreachable(self, exc: httpx.TransportError) -> ThawError:
        return Unavailable(f"cannot reach the gateway at {self.url}: {exc}",
                           code="unreachable")

    async def _send(self, method: str, path: str, stream: bool,
                    kwargs: dict[str, Any]) -> httpx.Response:
        headers = self._headers(kwargs.pop("headers", None))
        replay = retries.replayable(kwargs.get("content"))

        async def attempt() -> httpx.Response:
            req = self._http.build_request(method, path, headers=headers, **kwargs)
            try:
                resp = await self._http.send(req, stream=stream)
            except httpx.ConnectError as exc:
                raise retries.mark_retryable(self._unreachable(exc), method, None,
                                             replay) from exc
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
            if resp.status_code >= 400:
                try:
                    await resp.aread()
                finally:
                    await resp.aclose()
                raise retries.mark_retryable(error_from(resp), method, resp, replay)
            return resp

        return await retries.acall(self.retry, attempt)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """As Client.request."""
        return await self._send(method, path, False, kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str,
                     **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """As Client.stream."""
        resp = await self._send(method, path, True, kwargs)
        try:
            yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        finally:
            await resp.aclose()

    def function(self, name: str) -> AsyncFunction:
        return AsyncFunction(self, name)

    def invocation(self, invocation_id: str) -> AsyncInvocation:
        return AsyncInvocation(self, invocation_id)

    async def deploy(self, path: str | Path, *, force: bool = False,
                     wait: bool = True) -> dict[str, Any]:
        """As Client.deploy; the folder is packed in a thread (off the event loop)."""
        storage: dict[str, Any] = {}
        loop = asyncio.get_running_loop()

        def quota() -> dict[str, Any]:
            future = asyncio.run_coroutine_threadsafe(self.request("GET", "/v1/storage"),
                                                      loop)
            storage.update(future.result().json())
            return storage

        bundle = await asyncio.to_thread(pack, Path(path), quota)
        return await self.deploy_bundle(bundle, force=force, wait=wait)

    async def deploy_bundle(self, bundle: bytes, *, force: bool = False,
                            wait: bool = True) -> dict[str, Any]:
        """As Client.deploy_bundle."""
        plan = ChunkedDeploy.of(bundle, force=force, wait=wait)
        if plan is None:
            resp = await self.request(
                "POST", "/v1/functions", content=bundle, timeout=DEPLOY_TIMEOUT,
                params={"wait": str(wait).lower(), "force": str(force).lower()},
                headers={"Content-Type": "application/gzip"})
            doc: dict[str, Any] = resp.json()
            return doc
        for question in plan.questions():
            plan.lacking((await self.request("POST", "/v1/blobs/missing",
                                             json=question)).json())
        for piece in plan.missing:
            await self.request("PUT", f"/v1/blobs/{piece.digest}", content=piece.data,
                               headers={"Content-Type": "application/octet-stream"},
                               timeout=DEPLOY_TIMEOUT)
        method, url, kwargs = plan.commit()
        doc = (await self.request(method, url, **kwargs)).json()
        return doc


class AsyncFunction:
    """As thaw.client.Function."""

    def __init__(self, client: AsyncClient, name: str,
                 sub_path: str = "") -> None:
        self.client = client
        self.name = name
        self.sub_path = sub_path.strip("/")
        self._url: str | None = None

    def at(self, sub_path: str) -> AsyncFunction:
        """The same function called at a sub-path: /fn/TENANT/NAME/SUB_PATH."""
        return AsyncFunction(self.client, self.name, sub_path)

    async def url(self) -> str:
        """The function's URL as the API reports it (the function origin)."""
        if self._url is None:
            doc = (await self.client.request("GET", f"/v1/functions/{self.name}")).json()
            self._url = str(doc["url"]) + (f"/{self.sub_path}" if self.sub_path else "")
        return self._url

    async def call(self, **inputs: Any) -> Any:
        return decoded(await self.client.request("POST", await self.url(), json=inputs))

    async def stream(self, **inputs: Any) -> AsyncIterator[str]:
        async with self.client.stream("POST", await self.url(), json=inputs,
                                      headers=stream_headers()) as resp:
            if not resp.headers.get("Content-Type", "").startswith(SSE_TYPE):
                async for line in resp.aiter_lines():
                    yield line
                return
            reader = EventReader()
            async for line in resp.aiter_lines():
                payload = reader.feed(line)
                if reader.done:
                    return
                if payload is not None:
                    yield payload

    async def submit(self, **inputs: Any) -> AsyncInvocation:
        resp = await self.client.request("POST", await self.url(), json=inputs,
                                         headers=ASYNC_HEADERS)
        return AsyncInvocation(self.client, accepted_id(resp))


class AsyncInvocation:
    """As thaw.client.Invocation."""

    def __init__(self, client: AsyncClient, invocation_id: str) -> None:
        self.client = client
        self.id = invocation_id

    async def get(self) -> dict[str, Any]:
        doc: dict[str, Any] = (await self.client.request(
            "GET", f"/v1/invocations/{self.id}")).json()
        return doc

    async def status(self) -> str:
        return str((await self.get())["status"])

    async def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            resp = await self.client.request(
                "GET", f"/v1/invocations/{self.id}/result", headers=wait_header(left),
                timeout=result_timeout(left))
            if resp.status_code != 303:
                return decoded(resp)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"invocation {self.id} did not finish within "
                                    f"{math.ceil(timeout or 0)}s", code="timeout")

    async def cancel(self) -> str:
        doc = (await self.client.request("POST", f"/v1/invocations/{self.id}/cancel")).json()
        return str(doc["status"])
