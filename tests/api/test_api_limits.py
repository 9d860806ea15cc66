"""The admin API against hostile clients (issue #22, items 6 and 12), on loopback.

Every test runs the real API (uvicorn in a thread of this process, SQLite) and real HTTP
clients (httpx, or a raw socket where the test must control what is sent). No mocks: the
server runs here. What each asserts was measured before the fix (same loopback, same
client): an anonymous 200 MB upload to ``POST /api/report`` was read whole into a 195 MB
temporary file before the 401 came back; 30 wrong tokens got 30 x 401, no 429, no log line
and no audit row; the API spoke plain HTTP only and the login cookie was never ``Secure``.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from types import TracebackType

import httpx
import pytest

from node.api.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE
from node.api.limits import MAX_CLIENTS, FailedAuthLimiter, client_key
from node.settings import ConfigError, load_settings
from tests.api.conftest import ApiEnv, EnvFactory
from tests.delivery.conftest import PKI, pki  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BIG = 200 * MIB
#: what a refused request may have pushed into the socket buffers (loopback autotuning lets
#: a few MiB through before the server's close stops the client); the defect sent all 200
SENT_BOUND = 48 * MIB
#: the largest file the server process may open during a refused upload (the defect: 195 MiB)
FILE_BOUND = 16 * MIB
ANSWER_SECONDS = 10.0  # generous on a loaded 2-core machine; the refusals take ~0.1 s
BAD_TOKEN = "cxr_" + "x" * 43
BOUNDARY = "cxrtestboundary"


class Stream:
    """A multipart upload of ``total`` zero bytes, produced lazily; counts what was taken."""

    def __init__(self, total: int, chunk: int = MIB) -> None:
        self.total = total
        self.chunk = chunk
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        block = b"\0" * self.chunk
        while self.sent < self.total:
            self.sent += self.chunk
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class PeakOpenFile:
    """The largest regular file this process (the server runs in it) opens while active.

    Starlette spools an upload over 1 MiB to an unnamed temporary file; this watches
    ``/proc/self/fd`` every 20 ms for files that were not open before (by inode, so that a
    reused descriptor number is not missed).
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._before: set[tuple[int, int]] = set()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _open_files() -> Iterator[os.stat_result]:
        for fd in os.listdir("/proc/self/fd"):
            try:
                st = os.fstat(int(fd))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield st

    def _watch(self) -> None:
        while not self._stop.is_set():
            for st in self._open_files():
                if (st.st_dev, st.st_ino) not in self._before:
                    self.peak = max(self.peak, st.st_size)
            time.sleep(0.02)

    def __enter__(self) -> PeakOpenFile:
        self._before = {(st.st_dev, st.st_ino) for st in self._open_files()}
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        time.sleep(0.1)  # one more look after the answer
        self._stop.set()
        self._thread.join(timeout=5)


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` (headers and the start of a body), then read the answer's head
    without sending more; a server that waits for the rest of the body times out here."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SECONDS) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _declared_upload(path: str, headers: dict[str, str], declared: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {declared}"]
    lines += [f"{k}: {v}" for k, v in {**MULTIPART, **headers}.items()]
    start = next(iter(Stream(0)))  # the multipart part's head: a well-formed start
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + start + b"\0" * (256 * 1024)


# --- item 6: authentication before the body, body sizes ------------------------------------


def test_anonymous_upload_is_refused_before_its_body_is_read(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    for headers in ({}, {"Authorization": f"Bearer {BAD_TOKEN}"}):
        body = Stream(BIG)
        t0 = time.monotonic()
        with PeakOpenFile() as files:
            r = httpx.post(
                f"{env.base}/api/report",
                content=body,
                headers={**MULTIPART, **headers},
                timeout=ANSWER_SECONDS * 3,
            )
        elapsed = time.monotonic() - t0
        assert r.status_code == 401, r.text
        assert elapsed < ANSWER_SECONDS, elapsed
        assert body.sent < SENT_BOUND, body.sent
        assert files.peak < FILE_BOUND, files.peak
        assert r.json()["detail"]
        assert r.headers["connection"] == "close"


def test_the_answer_comes_before_the_declared_body(make_env: EnvFactory) -> None:
    """A raw client declares 200 MiB, sends 256 KiB and waits: the refusal must come
    without the rest (401 without credentials, 403 for a session without its CSRF header)."""
    env = make_env(model=False)
    port = env.settings.api_port
    head = _raw_exchange(port, _declared_upload("/api/report", {}, BIG))
    assert head.startswith(b"HTTP/1.1 401"), head[:200]
    assert b"connection: close" in head.lower()
    with env.client() as c:
        r = c.post("/api/session", json={"token": env.tokens["operator"]})
        assert r.status_code == 200
        cookie = f"{SESSION_COOKIE}={r.cookies[SESSION_COOKIE]}"
    head = _raw_exchange(port, _declared_upload("/api/report", {"Cookie": cookie}, BIG))
    assert head.startswith(b"HTTP/1.1 403"), head[:200]
    assert b"connection: close" in head.lower()


def test_uploads_over_the_limit_get_413(make_env: EnvFactory) -> None:
    env = make_env(model=False, api_max_upload_mb=8)
    auth = {"Authorization": f"Bearer {env.tokens['operator']}"}
    with httpx.Client(base_url=env.base, headers=auth, timeout=ANSWER_SECONDS * 3) as c:
        # declared too large: refused from Content-Length, before reading
        head = _raw_exchange(
            env.settings.api_port,
            _declared_upload("/api/report", auth, BIG),
        )
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        # chunked: refused once the bytes read pass the limit
        body = Stream(BIG)
        t0 = time.monotonic()
        with PeakOpenFile() as files:
            r = c.post("/api/report", content=body, headers=MULTIPART)
        assert r.status_code == 413, r.text
        assert "8 MiB" in r.json()["detail"]
        assert time.monotonic() - t0 < ANSWER_SECONDS
        assert body.sent < SENT_BOUND, body.sent
        assert files.peak < FILE_BOUND, files.peak
        # a real chest CR (7.2 MB) is under the limit: it reaches the route (no model: 503)
        r = c.post("/api/report", files={"file": ("rg1.dcm", env.template, "application/dicom")})
        assert r.status_code == 503, r.text


def test_json_bodies_are_small_even_for_the_login(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    body = Stream(BIG)
    r = httpx.post(
        f"{env.base}/api/session",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=ANSWER_SECONDS * 3,
    )
    assert r.status_code == 413, r.text
    assert "256 KiB" in r.json()["detail"]
    assert body.sent < SENT_BOUND, body.sent


# --- item 12: failed authentication is throttled, logged and audited ----------------------


def _audit_rows(env: ApiEnv, action: str) -> list[tuple[str, dict[str, object]]]:
    return [(a.actor, dict(a.detail or {})) for a in env.audit(action)]


def test_wrong_tokens_are_throttled_per_address(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """10 failures (a long window: no refill during the test), then 429 with Retry-After.
    A valid token from the same address is still served: a client that knows its token is
    not locked out by its own typos, nor by an attacker behind the same address."""
    env = make_env(model=False, api_auth_max_failures=10, api_auth_window_seconds=3600)
    caplog.set_level(logging.WARNING)
    statuses = []
    with httpx.Client(base_url=env.base, timeout=ANSWER_SECONDS) as c:
        for i in range(30):
            bad = {"Authorization": f"Bearer {BAD_TOKEN}{i}"}
            if i % 2:  # a POST with a body: refused by the middleware, before the body
                r = c.post("/api/jobs/1/cancel", json={"reason": "x"}, headers=bad)
            else:
                r = c.get("/api/jobs", headers=bad)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert 1 <= int(r.headers["retry-after"]) <= 3600
                assert "too many failed authentications" in r.json()["detail"]
        assert statuses == [401] * 10 + [429] * 20, statuses
        ok = c.get("/api/jobs", headers={"Authorization": f"Bearer {env.tokens['viewer']}"})
        assert ok.status_code == 200
    # another address (127.0.0.2 is loopback too) has its own count
    with httpx.Client(
        base_url=env.base,
        timeout=ANSWER_SECONDS,
        transport=httpx.HTTPTransport(local_address="127.0.0.2"),
    ) as other:
        r = other.get("/api/jobs", headers={"Authorization": f"Bearer {BAD_TOKEN}"})
        assert r.status_code == 401
    failed = _audit_rows(env, "auth.failed")
    assert [a for a, _ in failed].count("client:127.0.0.1") == 10
    assert [a for a, _ in failed].count("client:127.0.0.2") == 1
    throttled = _audit_rows(env, "auth.throttled")
    assert [a for a, _ in throttled] == ["client:127.0.0.1"]
    # logged with the address and reason, one line per counted failure, never the token
    lines = [r.getMessage() for r in caplog.records if r.name == "node.api.auth"]
    assert sum("failed bearer authentication from 127.0.0.1" in m for m in lines) == 10
    assert sum("too many failed authentications from 127.0.0.1" in m for m in lines) == 1
    assert not any(BAD_TOKEN in m or env.tokens["viewer"] in m for m in caplog.messages)
    assert not any(BAD_TOKEN in str(d) for _, d in failed + throttled)


def test_failed_logins_are_logged_audited_and_throttled(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(model=False, api_auth_max_failures=3, api_auth_window_seconds=3600)
    caplog.set_level(logging.WARNING)
    wrong = "cxr_" + "w" * 43
    with env.client() as c:
        codes = [c.post("/api/session", json={"token": wrong}).status_code for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        # the real token still logs in from here
        r = c.post("/api/session", json={"token": env.tokens["viewer"]})
        assert r.status_code == 200
        # plain HTTP: the cookies cannot be Secure, and no HSTS
        assert "secure" not in r.headers.get("set-cookie", "").lower()
        assert "strict-transport-security" not in r.headers
    failed = _audit_rows(env, "auth.failed")
    assert len(failed) == 3
    assert all(a == "client:127.0.0.1" and d["kind"] == "login" for a, d in failed)
    assert len(_audit_rows(env, "auth.throttled")) == 1
    logins = [m for m in caplog.messages if "failed login authentication from 127.0.0.1" in m]
    assert len(logins) == 3
    assert not any(wrong in m for m in caplog.messages)
    assert not any(wrong in str(d) for _, d in failed)


# --- HTTPS ---------------------------------------------------------------------------------


def test_https_with_the_dicom_tls_certificate(make_env: EnvFactory, pki: PKI) -> None:  # noqa: F811 (fixture)
    env = make_env(model=False, tls_cert_file=pki.node_cert, tls_key_file=pki.node_key)
    assert env.settings.api_https
    base = f"https://127.0.0.1:{env.settings.api_port}"
    verify = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(base_url=base, verify=verify, timeout=ANSWER_SECONDS) as c:
        r = c.get("/health")
        assert r.status_code == 200
        assert r.headers["strict-transport-security"].startswith("max-age=")
        r = c.post("/api/session", json={"token": env.tokens["operator"]})
        assert r.status_code == 200, r.text
        cookies = r.headers.get_list("set-cookie")
        assert {c.split("=", 1)[0] for c in cookies} == {SESSION_COOKIE, CSRF_COOKIE}
        assert all("secure" in [p.strip().lower() for p in c.split(";")] for c in cookies)
        # the session works over HTTPS (the client sends Secure cookies back on https)
        csrf = r.json()["csrf_token"]
        assert c.get("/api/session").json()["via"] == "cookie"
        assert c.delete("/api/session", headers={CSRF_HEADER: csrf}).status_code == 204
    # plain HTTP on that port gets no HTTP answer
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{env.settings.api_port}/health", timeout=ANSWER_SECONDS)


# --- settings and the limiter itself -------------------------------------------------------


def test_settings_refuse_unsafe_api_transport(pki: PKI) -> None:  # noqa: F811 (fixture)
    with pytest.raises(ConfigError, match=r"^api_tls"):
        load_settings(api_tls=True)
    with pytest.raises(ConfigError, match=r"^api_tls"):
        load_settings(api_host="0.0.0.0")
    assert not load_settings(api_host="0.0.0.0", api_tls=False).api_https
    s = load_settings(api_host="0.0.0.0", tls_cert_file=pki.node_cert, tls_key_file=pki.node_key)
    assert s.api_https
    assert not load_settings(
        tls_cert_file=pki.node_cert, tls_key_file=pki.node_key, api_tls=False
    ).api_https
    for bad in ({"api_max_upload_mb": 0}, {"api_auth_max_failures": 0}):
        with pytest.raises(ConfigError, match=rf"^{next(iter(bad))}"):
            load_settings(None, **bad)
    with pytest.raises(ConfigError, match=r"^api_auth_window_seconds"):
        load_settings(api_auth_window_seconds=0)


def test_limiter_refills_and_stays_bounded() -> None:
    now = [0.0]
    lim = FailedAuthLimiter(3, 30.0, clock=lambda: now[0])
    assert [lim.failure("a").allowed for _ in range(3)] == [True] * 3
    first, second = lim.failure("a"), lim.failure("a")
    assert not first.allowed and first.first_refusal and first.retry_after == pytest.approx(10)
    assert not second.allowed and not second.first_refusal
    now[0] += 10.0  # one failure refilled (3 per 30 s)
    assert lim.failure("a").allowed and not lim.failure("a").allowed
    # many addresses: all together get 3 x GLOBAL_FACTOR (30) per 30 s; "a" took 3, the
    # 10 s refilled them (capped at 30), then "a" took 1 more: 29 left
    assert FailedAuthLimiter.GLOBAL_FACTOR == 10
    verdicts = [lim.failure(f"10.0.0.{i}") for i in range(40)]
    assert sum(v.allowed for v in verdicts) == 29
    refused = [v for v in verdicts if not v.allowed]
    assert all(v.scope == "all" for v in refused)
    assert [v.first_refusal for v in refused] == [True] + [False] * (len(refused) - 1)
    for i in range(MAX_CLIENTS + 500):  # the table keeps the newest addresses only
        lim.failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(lim) == MAX_CLIENTS


def test_client_key_groups_ipv6_by_64() -> None:
    from starlette.requests import HTTPConnection

    def key(host: str) -> str:
        return client_key(HTTPConnection({"type": "http", "client": (host, 1), "headers": []}))

    assert key("2001:db8:1:2:aaaa::1") == key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("::ffff:10.0.0.7") == "10.0.0.7"
    assert key("10.0.0.7") == "10.0.0.7"
