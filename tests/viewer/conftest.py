"""Fixtures for the real-viewer tests: OHIF (from its npm package) on a real Orthanc.

* ``ohif_dist``: the built OHIF viewer, ``@ohif/app``'s ``dist/``, that
  ``scripts/fetch-ohif.sh`` unpacks (``CXR_NODE_OHIF_DIR``, default
  ``~/.cache/llm-cxr-node/ohif-3.11.1``); skipped when absent.
* ``viewer_orthanc``: Orthanc with its DICOMweb plugin configured as OHIF needs it (full
  study and series metadata, WADO-URI at ``/wado``).
* ``ohif``: one same-origin HTTP server (threaded, 127.0.0.1, free port) that serves the
  viewer (unknown paths fall back to ``index.html``, as an SPA host does), an
  ``app-config.js`` whose ``dicomweb`` data source points at its own origin, and proxies
  ``/dicom-web/`` and ``/wado`` to Orthanc. The proxy passes the browser's ``Host``, so
  the BulkDataURIs Orthanc writes into metadata name this origin too.
* ``browser``: Debian's headless Chromium through Playwright, launched as the web console
  tests launch it (``playwright install`` is never run).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.dicom.orthanc import OrthancServer
from tests.web.conftest import launch_chromium

OHIF_VERSION = "3.11.1"
OHIF_MARKER = ".llm-cxr-node-ohif"  # written by scripts/fetch-ohif.sh once dist/ is complete
DICOMWEB_FOR_OHIF = {
    "Enable": True,
    "Root": "/dicom-web/",
    "EnableWado": True,
    "WadoRoot": "/wado",
    "StudiesMetadata": "Full",
    "SeriesMetadata": "Full",
}


def ohif_dist_dir() -> Path:
    """Where ``scripts/fetch-ohif.sh`` puts OHIF's ``dist/``."""
    configured = os.environ.get("CXR_NODE_OHIF_DIR")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llm-cxr-node" / f"ohif-{OHIF_VERSION}"


def app_config(origin: str) -> str:
    """OHIF's ``app-config.js``: one ``dicomweb`` data source on ``origin``.

    The shape follows the ``orthanc`` entry of the ``app-config.js`` that OHIF ships; the
    investigational-use dialog and the cross-origin / CPU-rendering notices are turned off
    so that nothing covers the study browser or the viewport.
    """
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "strictZSpacingForVolumeViewport": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 75, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomweb",
                "configuration": {
                    "friendlyName": "test Orthanc (llm-cxr-node viewer tests)",
                    "name": "orthanc",
                    "wadoUriRoot": f"{origin}/wado",
                    "qidoRoot": f"{origin}/dicom-web",
                    "wadoRoot": f"{origin}/dicom-web",
                    "qidoSupportsIncludeField": True,
                    "supportsReject": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"/** llm-cxr-node viewer tests */\nwindow.config = {json.dumps(config, indent=2)};\n"


def _proxied(path: str) -> bool:
    """Whether a request path goes to Orthanc: DICOMweb (QIDO-RS, WADO-RS) and WADO-URI."""
    return path.startswith("/dicom-web/") or path == "/wado" or path.startswith("/wado/")


def _handler(dist: Path, upstream: tuple[str, int]) -> type[Any]:
    class Handler(SimpleHTTPRequestHandler):
        """OHIF's dist/ with an SPA fallback, our app-config.js, and the Orthanc proxy."""

        config_js = b""  # set once the server knows its port

        extensions_map = {  # noqa: RUF012 - the base class's own attribute
            **SimpleHTTPRequestHandler.extensions_map,
            ".js": "application/javascript",
            ".mjs": "application/javascript",
            ".wasm": "application/wasm",
            ".json": "application/json",
            ".css": "text/css",
        }

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def _route(self) -> None:
            path = urlsplit(self.path).path
            if _proxied(path):
                self._proxy()
            elif self.command == "POST":
                self.send_error(405)
            elif path == "/app-config.js":
                self._send_bytes(self.config_js, "application/javascript")
            else:
                local = Path(self.translate_path(self.path))
                if not local.is_file() and not local.is_dir():
                    self.path = "/index.html"  # a client-side route of the SPA
                if self.command == "HEAD":
                    super().do_HEAD()
                else:
                    super().do_GET()

        def _send_bytes(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() in ("accept", "content-type", "content-length", "host", "range")
            }
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(*upstream, timeout=120)
            try:
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                except OSError as exc:
                    self.send_error(502, f"Orthanc did not answer: {exc!r}")
                    return
                self.send_response(response.status)
                for key in ("Content-Type", "Content-Length", "Content-Range"):
                    value = response.getheader(key)
                    if value is not None:
                        self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":  # stream: HTTP/1.0, the close ends the body
                    while chunk := response.read(64 * 1024):
                        self.wfile.write(chunk)
            except OSError:  # the browser went away (e.g. a cancelled prefetch)
                pass
            finally:
                conn.close()

    return Handler


@dataclass
class OhifServer:
    """The running same-origin server: OHIF + the proxy to Orthanc."""

    origin: str
    server: ThreadingHTTPServer
    thread: threading.Thread

    def viewer_url(self, study_uid: str) -> str:
        """OHIF's basic viewer (longitudinal mode) for one study."""
        return f"{self.origin}/viewer?StudyInstanceUIDs={study_uid}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    """OHIF's built ``dist/`` (``scripts/fetch-ohif.sh``), or skip."""
    dist = ohif_dist_dir()
    if not (dist / "index.html").is_file() or not (dist / OHIF_MARKER).is_file():
        pytest.skip(
            f"OHIF {OHIF_VERSION} viewer not found in {dist} "
            "(scripts/fetch-ohif.sh fetches it from the npm registry)"
        )
    return dist


@pytest.fixture(scope="module")
def viewer_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc whose DICOMweb plugin serves OHIF (full metadata, WADO-URI)."""
    with OrthancServer(
        tmp_path_factory.mktemp("viewer-orthanc"),
        modalities={},
        extra_config={"DicomWeb": DICOMWEB_FOR_OHIF},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def ohif(ohif_dist: Path, viewer_orthanc: OrthancServer) -> Iterator[OhifServer]:
    """OHIF and the Orthanc proxy on one free loopback port."""
    handler = _handler(ohif_dist, ("127.0.0.1", viewer_orthanc.http_port))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    handler.config_js = app_config(origin).encode()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
    thread.start()
    running = OhifServer(origin=origin, server=server, thread=thread)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for this module's viewer."""
    yield from launch_chromium()
