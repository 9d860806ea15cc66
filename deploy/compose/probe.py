#!/usr/bin/env python3
"""Container probes of llm-cxr-node, installed as ``cxr-node-probe`` in the images that
``deploy/compose/Dockerfile`` builds (Docker ``HEALTHCHECK``, Compose ``healthcheck``,
Kubernetes ``exec`` probes).

    cxr-node-probe tcp HOST:PORT                 a TCP connection is accepted
    cxr-node-probe http URL [--token-file FILE]  GET URL is answered 200
    cxr-node-probe --wait 600 tcp HOST:PORT      the same, tried every 2 s until it passes

Exit status 0 when healthy, 1 when not, with one line on stdout saying why (Docker keeps it
in ``docker inspect``, Kubernetes in the pod's events). ``--wait S`` repeats the probe until
it passes or ``S`` seconds have gone by: a Kubernetes init container waits so for the
inference engine, because a process on the remote backend loads its model once, at start,
and that load needs an engine that answers.

``tcp`` is for the storage SCP, which serves no HTTP: the connection is closed before any
A-ASSOCIATE-RQ, so the receive log does not record it (``CONFORMANCE.md``, "Receive log").

``http`` is for the admin API (``/health``, no token; ``/ready``, a viewer token). The
inference engine gets ``tcp`` too: llama_cpp.server listens only once its model is loaded,
and every HTTP route of it waits for the model's lock behind the requests being answered.
An ``https`` URL is fetched without verifying the certificate: the probe talks to its own
container over loopback, a name the node's certificate does not carry. With
``--token-file`` the file's content is sent as ``Authorization: Bearer``. While that file is
missing or empty (the token is created after the first start, see
``deploy/compose/README.md``), the probe asks ``/health`` of the same server instead and
says so: the container then counts as live, not yet as ready.

Standard library only, so a probe costs a fraction of a second and never imports the node.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["build_parser", "main", "probe_http", "probe_tcp"]

HEALTH_PATH = "/health"
RETRY_SECONDS = 2.0


def probe_tcp(address: str, timeout: float) -> tuple[bool, str]:
    """Connect to ``HOST:PORT`` and close at once; return (healthy, message)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return False, f"tcp: {address!r} is not HOST:PORT"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        return False, f"tcp {address}: {exc.strerror or type(exc).__name__}"
    return True, f"tcp {address}: accepted"


def _read_token(token_file: Path | None) -> str | None:
    if token_file is None:
        return None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None


def probe_http(url: str, timeout: float, token_file: Path | None = None) -> tuple[bool, str]:
    """GET ``url`` (with the token of ``token_file``); healthy when the answer is 200.

    Without a token in ``token_file`` (given but missing or empty) ``/health`` of the same
    server is asked instead.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False, f"http: {url!r} is not an http(s) URL"
    headers = {"Accept": "application/json"}
    note = ""
    token = _read_token(token_file)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    elif token_file is not None:
        url = urlunsplit((parts.scheme, parts.netloc, HEALTH_PATH, "", ""))
        note = f" (no token in {token_file}: checked {HEALTH_PATH} only)"
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            status = int(answer.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return False, f"GET {url}: {reason}{note}"
    return status == 200, f"GET {url}: {status}{note}"


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``[--timeout S] tcp HOST:PORT`` or ``http URL [--token-file F]``."""
    parser = argparse.ArgumentParser(
        prog="cxr-node-probe", description="Container probes of llm-cxr-node."
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="retry every 2 s for up to this many seconds"
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    tcp = sub.add_parser("tcp", help="a TCP connection to HOST:PORT is accepted")
    tcp.add_argument("address", metavar="HOST:PORT")
    http = sub.add_parser("http", help="GET URL is answered 200")
    http.add_argument("url", metavar="URL")
    http.add_argument("--token-file", type=Path, help="bearer token (falls back to /health)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one probe; print one line; return the exit status."""
    args = build_parser().parse_args(argv)
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        if args.kind == "tcp":
            ok, message = probe_tcp(args.address, args.timeout)
        else:
            ok, message = probe_http(args.url, args.timeout, args.token_file)
        if ok or time.monotonic() + RETRY_SECONDS > deadline:
            break
        time.sleep(RETRY_SECONDS)
    print(message, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
