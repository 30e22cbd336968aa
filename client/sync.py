"""The synchronous client: `Client`, a deployed `Function`, a stored `Invocation`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
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


class Client:
    """The platform's API at `url` with API key `key` (both default to what the `thaw`
    CLI uses: THAW_URL / THAW_API_KEY, the config file, `thaw up`'s dev key).

    Every error answer raises its typed ThawError (thaw.client.errors); 429 and 503
    are retried as `retry` allows (thaw.client.retry)."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or gateway_url()).rstrip("/")
        self._key = key
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key or credentials().key}", **(extra or {})}

    def request(self, method: str, path: str, *, retry: RetryPolicy | None = None,
                **kwargs: Any) -> httpx.Response:
        """One API request (`path` under the API URL, or an absolute URL); an answer
        below 400 is returned, any other raises."""
        headers = self._headers(kwargs.pop("headers", None))
        replay = retries.replayable(kwargs.get("content"))

        def attempt() -> httpx.Response:
            try:
                resp = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.ConnectError as exc:
                raise retries.mark_retryable(self._unreachable(exc), method, None,
                                             replay) from exc
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
            if resp.status_code >= 400:
                raise retries.mark_retryable(error_from(resp), method, resp, replay)
            return resp

        return retries.call(retry or self.retry, attempt)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives; errors (and retries before the
        answer's head) as in `request`."""
        headers = self._headers(kwargs.pop("headers", None))
        replay = retries.replayable(kwargs.get("content"))

        def attempt() -> httpx.Response:
            req = self._http.build_request(method, path, headers=headers, **kwargs)
            try:
                resp = self._http.send(req, stream=True)
            except httpx.ConnectError as exc:
                raise retries.mark_retryable(self._unreachable(exc), method, None,
                                             replay) from exc
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
            if resp.status_code >= 400:
                try:
                    resp.read()
                finally:
                    resp.close()
                raise retries.mark_retryable(error_from(resp), method, resp, replay)
            return resp

        resp = retries.call(self.retry, attempt)
        try:
            yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        finally:
            resp.close()

    def _unreachable(self, exc: httpx.TransportError) -> ThawError:
        return Unavailable(f"cannot reach the gateway at {self.url}: {exc}",
                           code="unreachable")

    def function(self, name: str) -> Function:
        """Function `name` of the key's tenant (looked up on first use)."""
        return Function(self, name)

    def invocation(self, invocation_id: str) -> Invocation:
        """A stored invocation by id (`Function.submit` answers one)."""
        return Invocation(self, invocation_id)

    def deploy(self, path: str | Path, *, force: bool = False,
               wait: bool = True) -> dict[str, Any]:
        """Pack the bundle folder `path` (with its thaw.toml) as `thaw deploy` does and
        deploy it: the function's JSON (name, version, state, url, unchanged, ...).
        `wait` waits for the snapshot build; `force` builds an unchanged bundle again."""
        bundle = pack(Path(path), lambda: self.request("GET", "/v1/storage").json())
        return self.deploy_bundle(bundle, force=force, wait=wait)

    def deploy_bundle(self, bundle: bytes, *, force: bool = False,
                      wait: bool = True) -> dict[str, Any]:
        """Deploy a packed bundle: one request up to the single-request cap, else as
        content-addressed chunks (only those the tenant lacks are sent)."""
        plan = ChunkedDeploy.of(bundle, force=force, wait=wait)
        if plan is None:
            doc: dict[str, Any] = self.request(
                "POST", "/v1/functions", content=bundle, timeout=DEPLOY_TIMEOUT,
                params={"wait": str(wait).lower(), "force": str(force).lower()},
                headers={"Content-Type": "application/gzip"}).json()
            return doc
        for question in plan.questions():
            plan.lacking(self.request("POST", "/v1/blobs/missing", json=question).json())
        for piece in plan.missing:
            self.request("PUT", f"/v1/blobs/{piece.digest}", content=piece.data,
                         headers={"Content-Type": "application/octet-stream"},
                         timeout=DEPLOY_TIMEOUT)
        method, url, kwargs = plan.commit()
        doc = self.request(method, url, **kwargs).json()
        return doc


class Function:
    """A deployed function: JSON in (its keyword arguments), JSON out."""

    def __init__(self, client: Client, name: str, sub_path: str = "") -> None:
        self.client = client
        self.name = name
        self.sub_path = sub_path.strip("/")
        self._url: str | None = None

    def at(self, sub_path: str) -> Function:
        """The same function called at a sub-path: /fn/TENANT/NAME/SUB_PATH."""
        return Function(self.client, self.name, sub_path)

    @property
    def url(self) -> str:
        """The function's URL as the API reports it (the function origin)."""
        if self._url is None:
            doc = self.client.request("GET", f"/v1/functions/{self.name}").json()
            self._url = str(doc["url"]) + (f"/{self.sub_path}" if self.sub_path else "")
        return self._url

    def call(self, **inputs: Any) -> Any:
        """Call it and wait: the answer's JSON (text or bytes if it is not JSON)."""
        return decoded(self.client.request("POST", self.url, json=inputs))

    def stream(self, **inputs: Any) -> Iterator[str]:
        """Call it asking for Server-Sent Events: each event's data as it arrives (a
        function that does not stream yields its answer's lines)."""
        with self.client.stream("POST", self.url, json=inputs,
                                headers=stream_headers()) as resp:
            if not resp.headers.get("Content-Type", "").startswith(SSE_TYPE):
                yield from resp.iter_lines()
                return
            reader = EventReader()
            for line in resp.iter_lines():
                payload = reader.feed(line)
                if reader.done:
                    return
                if payload is not None:
                    yield payload

    def submit(self, **inputs: Any) -> Invocation:
        """Queue the call (Prefer: respond-async) and return at once: its handle."""
        resp = self.client.request("POST", self.url, json=inputs, headers=ASYNC_HEADERS)
        return Invocation(self.client, accepted_id(resp))


class Invocation:
    """A stored invocation: its status, its result (waiting for it), cancel."""

    def __init__(self, client: Client, invocation_id: str) -> None:
        self.client = client
        self.id = invocation_id

    def get(self) -> dict[str, Any]:
        """The invocation's JSON document (status, timings, error, ...)."""
        doc: dict[str, Any] = self.client.request("GET", f"/v1/invocations/{self.id}").json()
        return doc

    def status(self) -> str:
        """queued, running, succeeded, failed, cancelled or expired."""
        return str(self.get()["status"])

    def result(self, timeout: float | None = None) -> Any:
        """The answer, as `Function.call` gives it, waiting up to `timeout` seconds
        (None: as long as it runs); ResultTimeout past it. A failed invocation raises
        its error, a cancelled one Conflict-like ThawError (410/409 from the API)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            resp = self.client.request(
                "GET", f"/v1/invocations/{self.id}/result", headers=wait_header(left),
                timeout=result_timeout(left))
            if resp.status_code != 303:
                return decoded(resp)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"invocation {self.id} did not finish within "
                                    f"{math.ceil(timeout or 0)}s", code="timeout")

    def cancel(self) -> str:
        """Cancel it: a queued one never runs, a running one is cut. Its new status."""
        doc = self.client.request("POST", f"/v1/invocations/{self.id}/cancel").json()
        return str(doc["status"])
