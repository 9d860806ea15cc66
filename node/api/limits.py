"""Bounds of the admin API against hostile clients: authentication before the body is read,
request body sizes, and a per-address throttle on failed authentication.

**Authentication before the body.** FastAPI reads and parses a route's body (JSON, or a
multipart upload spooled to a temporary file) *before* it runs the route's dependencies, so
the authentication dependency alone would let an anonymous client make the node read, and
write to disk, a body of any size before answering 401. :class:`AuthBeforeBody` is a small
pure ASGI middleware that authenticates every unsafe request under ``/api/`` (POST, PUT,
PATCH, DELETE; the login ``POST /api/session`` excepted, whose body *is* the credential) from
its headers alone, before the application sees it. A refused request is answered 401 / 403 /
429 without a byte of its body being read, with ``Connection: close`` when a body was
announced, so that the server closes the connection instead of draining the upload (RFC 9112
§9.6; RFC 9110 §15.5.14 for 413). An accepted request carries the caller in the request
state (:data:`PRINCIPAL_STATE`), which :func:`node.api.auth.authenticate` reuses. A pure
ASGI middleware was chosen over reading the body in the upload route after the dependencies:
every route with a body (JSON ones too) needs the same order, and the routes keep their
declared bodies in the OpenAPI schema.

**Body sizes.** FastAPI's own request body limit (``max_body_size``, Starlette's
``RequestBodyLimitMiddleware``) is set per router in :func:`node.api.app.create_app`:
:data:`JSON_BODY_LIMIT` for every route, ``api_max_upload_mb`` for the upload route. It
refuses a body whose ``Content-Length`` is over the limit before reading it, and a chunked
body as soon as the bytes read pass the limit: 413 (RFC 9110 §15.5.14).

**Failed authentication.** :class:`FailedAuthLimiter` is a token bucket per client address
(an IPv6 client by its /64 network): ``api_auth_max_failures`` failures, refilled at that
many per ``api_auth_window_seconds``, and a bucket ten times that size shared by all
addresses. Only *failures* consume them (a wrong or malformed bearer token, a failed login);
a valid token is always served, even from a throttled address, so that nobody can lock the
admins out by failing from their address (the tokens are 256-bit random secrets: throttling
is about log, audit and database load, not guessing). Once a bucket is empty, failures are
answered 429 with ``Retry-After`` (RFC 6585 §4, RFC 9110 §10.2.3) and no longer logged or
audited one by one. The table holds at most :data:`MAX_CLIENTS` addresses (least recently
failing dropped first).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from node.api.errors import ApiError, error_body

__all__ = [
    "JSON_BODY_LIMIT",
    "MAX_CLIENTS",
    "PRINCIPAL_STATE",
    "AuthBeforeBody",
    "FailedAuthLimiter",
    "Verdict",
    "client_key",
]

#: the body limit of every route that takes JSON (the largest, a 4000-character report to
#: turn into an image, is well under 64 KiB even with every character escaped)
JSON_BODY_LIMIT = 256 * 1024
#: addresses the failure table holds at most (about 100 bytes each)
MAX_CLIENTS = 4096
#: request-state attribute that carries the caller authenticated by :class:`AuthBeforeBody`
PRINCIPAL_STATE = "cxr_principal"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def client_key(conn: HTTPConnection) -> str:
    """The address a request's failures are counted against.

    IPv4 addresses (IPv4-mapped IPv6 included) as they are; IPv6 addresses by their /64
    network, the usual allocation to one host, so that a client cannot reset its count by
    changing the interface identifier. The client is the TCP peer, or the address in
    ``X-Forwarded-For`` when the peer is a proxy uvicorn trusts (``forwarded_allow_ips``,
    127.0.0.1 by default).
    """
    host = conn.client.host if conn.client is not None else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class Verdict:
    """What to do with one failed authentication.

    ``allowed``: answer 401 (and log and audit it); otherwise answer 429 with ``Retry-After``
    of ``retry_after`` seconds. ``first_refusal``: the first 429 of a run of refusals, to log
    and audit once; ``scope`` says whose allowance ran out: ``address`` (this client's) or
    ``all`` (the allowance of all clients together).
    """

    allowed: bool
    retry_after: float = 0.0
    first_refusal: bool = False
    scope: str = "address"


@dataclass
class _Bucket:
    size: float
    tokens: float
    at: float
    refusing: bool = False

    def refill(self, now: float, rate: float) -> None:
        self.tokens = min(self.size, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now

    def wait(self, rate: float) -> float:
        return (1.0 - self.tokens) / rate


class FailedAuthLimiter:
    """Token buckets of failed authentications, per client address and for all together
    (thread-safe, in memory).

    A failure is allowed (401) while both its address's bucket and the bucket of all
    addresses hold a token; it then takes one from each. The shared bucket bounds what many
    addresses together can add to the log and the audit table (an IPv6 attacker has many
    /64 networks): at most ``max_failures * GLOBAL_FACTOR`` allowed failures per window,
    and so at most ``GLOBAL_FACTOR`` addresses a window can run into their own limit.

    Parameters
    ----------
    max_failures
        Bucket size: failures an address may make in a burst (``api_auth_max_failures``).
    window_seconds
        The buckets refill their size per ``window_seconds`` (``api_auth_window_seconds``).
    max_clients
        Addresses tracked at most; the least recently failing one is dropped first.
    clock
        Monotonic seconds (``time.monotonic``).
    """

    GLOBAL_FACTOR = 10

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or not window_seconds > 0 or max_clients < 1:
            raise ValueError("max_failures, window_seconds and max_clients must be positive")
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        size = float(max_failures * self.GLOBAL_FACTOR)
        self._all = _Bucket(size=size, tokens=size, at=clock())

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _rate(self, bucket: _Bucket) -> float:
        return bucket.size / self.window_seconds

    def failure(self, key: str) -> Verdict:
        """Count one failed authentication of ``key`` (see :func:`client_key`)."""
        with self._lock:
            now = self._clock()
            mine = self._buckets.pop(key, None)
            if mine is None:
                size = float(self.max_failures)
                mine = _Bucket(size=size, tokens=size, at=now)
            mine.refill(now, self._rate(mine))
            self._all.refill(now, self._rate(self._all))
            if mine.tokens < 1.0:
                verdict = Verdict(
                    False, mine.wait(self._rate(mine)), not mine.refusing, scope="address"
                )
                mine.refusing = True
            elif self._all.tokens < 1.0:
                verdict = Verdict(
                    False, self._all.wait(self._rate(self._all)), not self._all.refusing, "all"
                )
                self._all.refusing = True
            else:
                mine.tokens -= 1.0
                self._all.tokens -= 1.0
                mine.refusing = self._all.refusing = False
                verdict = Verdict(True)
            self._buckets[key] = mine  # most recent last
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return verdict


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class AuthBeforeBody:
    """Pure ASGI middleware: authenticate unsafe ``/api/`` requests before their body is read.

    Parameters
    ----------
    app
        The application.
    authenticate
        Called in a worker thread with the request's :class:`~starlette.requests.HTTPConnection`
        (headers only); returns the caller or raises :class:`~node.api.errors.ApiError`
        (401, 403 or 429).
    public
        ``(method, path)`` pairs let through unauthenticated (the login).
    prefix
        Path prefix of the guarded routes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[HTTPConnection], Any],
        public: Collection[tuple[str, str]] = (),
        prefix: str = "/api/",
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.public = frozenset((m.upper(), p) for m, p in public)
        self.prefix = prefix

    def _guarded(self, scope: Scope) -> bool:
        method = str(scope["method"]).upper()
        path = str(scope["path"])
        return (
            method not in _SAFE_METHODS
            and path.startswith(self.prefix)
            and (method, path) not in self.public
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(scope):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        try:
            principal = await anyio.to_thread.run_sync(self.authenticate, conn)
        except ApiError as exc:
            headers = dict(exc.headers)
            if _has_body(scope):
                headers["Connection"] = "close"  # do not drain a body nobody will read
            response = JSONResponse(
                error_body(exc.http_status, exc.message, type(exc).__name__),
                status_code=exc.http_status,
                headers=headers,
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
        await self.app(scope, receive, send)
