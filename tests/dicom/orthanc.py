"""A real Orthanc (Debian package) on free loopback ports, for integration tests.

Usage::

    with OrthancServer(tmp_path, modalities={"NODE": ("NODE", "127.0.0.1", node_port)}) as pacs:
        pacs.rest("GET", "/instances").json()

The config (after the Orthanc Book's configuration reference): free HTTP and DICOM ports, no
remote access, storage and index in ``tmp_dir``, the DICOMweb plugin (``/dicom-web/``), and
optionally the Python plugin with a script (e.g. a forwarding ``OnStoredInstance`` callback).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, terminate

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"


class OrthancServer:
    """Start and stop a private Orthanc; a context manager.

    Parameters
    ----------
    tmp_dir
        Directory for the config, storage, index and log (created if missing).
    modalities
        ``DicomModalities``: name -> ``(aet, host, port)`` of peers Orthanc may send to.
    aet
        Orthanc's own AE title.
    dicomweb
        Load the DICOMweb plugin (``/dicom-web/``).
    python_script
        A Python plugin script to load (needs ``libOrthancPython.so``).
    overwrite_instances
        ``OverwriteInstances``: a re-sent SOP Instance UID replaces the stored one.
    extra_config
        More configuration keys (override the defaults).
    startup_timeout
        Seconds to wait for ``GET /system``.
    """

    def __init__(
        self,
        tmp_dir: Path,
        *,
        modalities: Mapping[str, Sequence[Any]] | None = None,
        aet: str = "ORTHANC",
        dicomweb: bool = True,
        python_script: Path | None = None,
        overwrite_instances: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(self.binary).exists():
            pytest.skip("Orthanc is not installed (scripts/setup.sh --peers installs it as root)")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            pytest.skip(f"orthanc-dicomweb plugin not installed ({DICOMWEB_PLUGIN})")
        if python_script is not None and not PYTHON_PLUGIN.exists():
            pytest.skip(f"orthanc-python plugin not installed ({PYTHON_PLUGIN})")
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.http_url}/dicom-web"
        self.log_path = self.dir / "orthanc.log"
        self.startup_timeout = startup_timeout
        plugins = []
        if dicomweb:
            plugins.append(str(DICOMWEB_PLUGIN))
        if python_script is not None:
            plugins.append(str(PYTHON_PLUGIN))
        config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "StorageCompression": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "OverwriteInstances": overwrite_instances,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "Plugins": plugins,
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        }
        if python_script is not None:
            config["PythonScript"] = str(python_script)
        config.update(extra_config or {})
        self.config = config
        self.config_path = self.dir / "orthanc.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.http_url, timeout=30.0)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> OrthancServer:
        """Write the config, start Orthanc and wait until ``GET /system`` answers."""
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [self.binary, str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                if self._client.get("/system").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer GET /system: {self.log_tail()}")

    def stop(self) -> None:
        """Terminate Orthanc and wait for it to exit (so its index is unlocked)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate(proc, timeout=15)

    def close(self) -> None:
        """Stop Orthanc and close the HTTP client."""
        self.stop()
        self._client.close()

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, n: int = 3000) -> str:
        """The last ``n`` characters of Orthanc's log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- REST helpers -------------------------------------------------------------------

    def rest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a REST request (``path`` starts with ``/``) and return the response."""
        return self._client.request(method, path, **kwargs)

    def get_json(self, path: str) -> Any:
        """``GET path`` and return the JSON body (raises on HTTP errors)."""
        response = self.rest("GET", path)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return list(self.get_json("/instances"))

    def simplified_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, or ``None``."""
        response = self.rest(
            "POST",
            "/tools/lookup",
            content=sop_instance_uid,
        )
        response.raise_for_status()
        for hit in response.json():
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        return None

    def upload(self, path: Path) -> str:
        """Store a Part 10 file through ``POST /instances``; returns the Orthanc id."""
        response = self.rest("POST", "/instances", content=Path(path).read_bytes())
        response.raise_for_status()
        return str(response.json()["ID"])

    def file_bytes(self, instance_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        response = self.rest("GET", f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def send_to_modality(self, modality: str, orthanc_ids: Sequence[str]) -> Any:
        """C-STORE the given resources to a configured modality (``POST /modalities/{m}/store``),
        as a PACS auto-route does; returns Orthanc's JSON answer (raises on HTTP errors)."""
        response = self.rest(
            "POST", f"/modalities/{modality}/store", json=list(orthanc_ids), timeout=120.0
        )
        response.raise_for_status()
        return response.json()

    def wait_for_instance(
        self, sop_instance_uid: str, *, timeout: float = 60.0, interval: float = 0.2
    ) -> str:
        """Poll until an instance with this SOP Instance UID is stored; return its Orthanc id.

        Raises
        ------
        TimeoutError
            If it does not arrive within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find_instance(sop_instance_uid)
            if found is not None:
                return found
            time.sleep(interval)
        raise TimeoutError(f"instance {sop_instance_uid} not in Orthanc after {timeout} s")

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Simplified tags of every instance of a study (by Study Instance UID)."""
        response = self.rest(
            "POST",
            "/tools/find",
            json={
                "Level": "Instance",
                "Query": {"StudyInstanceUID": study_instance_uid},
                "Expand": True,
            },
        )
        response.raise_for_status()
        return [self.simplified_tags(str(item["ID"])) for item in response.json()]
