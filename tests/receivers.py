"""Real receivers of the node's HL7 and FHIR output, on loopback, for tests.

- :func:`hl7_listener`: hl7apy's ``MLLPServer`` (a threaded TCP server). Its handler parses
  each ORU^R01 with hl7apy at STRICT validation, checks the 2.5.1 structure, MSH-9 and
  OBR-25, keeps the message and answers an ACK built with hl7apy (AA, or AE/AR with an ERR
  segment), or closes without answering, or never answers (:attr:`Receiver.mode`).
- :func:`fhir_server`: a FHIR server such as HAPI (a Java application) cannot run on this
  machine, so it is a real ``http.server`` that checks the bearer token :data:`TOKEN` and
  validates what it receives with fhir.resources (R4B models) and with the value-set and
  reference rules written out here, then answers as a FHIR server would: 200 with a
  transaction-response Bundle for a transaction, 201 for a conditional update. Error
  statuses and a slow server are produced on demand (:attr:`FhirReceiver.mode`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from integration.fhir_report import DRAFT_STATUS
from integration.fhir_withdrawal import WITHDRAWN_STATUS
from tests.helpers import free_port, port_open, wait_for

TOKEN = "test-token-3f9a"


@dataclass
class Receiver:
    """What the hl7apy listener does and what it received."""

    mode: str = "AA"
    err_code: str = "207"
    received: list[Message] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


def _ack(incoming: Message, code: str, err_code: str | None) -> str:
    reply = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    reply.msh.msh_3 = incoming.msh.msh_5.to_er7()
    reply.msh.msh_4 = incoming.msh.msh_6.to_er7()
    reply.msh.msh_5 = incoming.msh.msh_3.to_er7()
    reply.msh.msh_6 = incoming.msh.msh_4.to_er7()
    reply.msh.msh_9 = "ACK^R01^ACK"
    reply.msh.msh_10 = "ACK" + incoming.msh.msh_10.to_er7()[:17]
    reply.msh.msh_11 = "P"
    reply.msa.msa_1 = code
    reply.msa.msa_2 = incoming.msh.msh_10.to_er7()
    if err_code is not None:
        err = reply.add_segment("ERR")
        err.err_3 = f"{err_code}^Error^HL70357"
        err.err_4 = "E"
    assert reply.validate() is True
    return str(reply.to_er7())


def _handler_for(receiver: Receiver) -> type[AbstractHandler]:
    class OruHandler(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            message = parse_message(self.incoming_message, validation_level=VALIDATION_LEVEL.STRICT)
            assert message.validate() is True
            assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
            obr = message.oru_r01_patient_result.oru_r01_order_observation.obr
            assert obr.obr_25.to_er7() in ("R", "C")
            receiver.received.append(message)
            if receiver.mode == "close":
                return ""  # hl7apy writes nothing and closes the connection
            if receiver.mode == "hang":
                receiver.release.wait(30)
                return ""
            err = None if receiver.mode == "AA" else receiver.err_code
            ack = _ack(message, receiver.mode, err)
            return "\x0b" + ack + "\x1c\r"

    return OruHandler


@pytest.fixture
def hl7_listener() -> Iterator[tuple[int, Receiver]]:
    """A real hl7apy MLLPServer on a free loopback port."""
    receiver = Receiver()
    port = free_port()
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (_handler_for(receiver),)})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    wait_for(lambda: port_open(port), timeout=10)
    try:
        yield port, receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class FhirReceiver:
    mode: str = "ok"
    received: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _validate_like_a_server(method: str, body: dict[str, Any]) -> list[str]:
    """Parse with fhir.resources and check what it does not (R4 value sets, targets)."""
    problems: list[str] = []
    if method == "POST":
        bundle = Bundle.model_validate(body)
        if bundle.type != "transaction":
            problems.append(f"Bundle.type {bundle.type}")
        by_url = {e["fullUrl"]: e["resource"]["resourceType"] for e in body["entry"]}
        for entry in body["entry"]:
            resource = entry["resource"]
            if entry["request"]["method"] not in ("POST", "PUT"):
                problems.append("request.method")
            if resource["resourceType"] == "DiagnosticReport":
                DiagnosticReport.model_validate(resource)
                if resource["status"] not in (DRAFT_STATUS, WITHDRAWN_STATUS):
                    problems.append(f"status {resource['status']}")
                if resource["subject"].get("type") != "Patient":
                    problems.append("subject type")
                if "performer" in resource or "resultsInterpreter" in resource:
                    problems.append("an AI draft has no performer / interpreter")
            if resource["resourceType"] == "Provenance":
                for agent in resource["agent"]:
                    if by_url.get(agent["who"]["reference"]) != "Device":
                        problems.append("Provenance.agent.who does not resolve to the Device")
                for target in resource["target"]:
                    if by_url.get(target["reference"]) != "DiagnosticReport":
                        problems.append("Provenance.target does not resolve to the report")
    else:
        report = DiagnosticReport.model_validate(body)
        if report.status not in (DRAFT_STATUS, WITHDRAWN_STATUS):
            problems.append(f"status {report.status}")
    return problems


def _handler(receiver: FhirReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep the test output quiet
            return

        def _answer(self, status: int, body: dict[str, Any], **headers: str) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _outcome(self, status: int, code: str) -> None:
            self._answer(
                status,
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": code, "diagnostics": "Müller"}],
                },
            )

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._outcome(401, "login")
                return
            if receiver.mode == "slow":
                time.sleep(3)
            if receiver.mode in ("500", "429", "400"):
                self._outcome(
                    int(receiver.mode), "exception" if receiver.mode != "400" else "invalid"
                )
                return
            if not self.headers.get("Content-Type", "").startswith("application/fhir+json"):
                self._outcome(415, "not-supported")
                return
            body = json.loads(raw)
            try:
                problems = _validate_like_a_server(method, body)
            except ValueError as exc:  # pydantic ValidationError
                problems = [f"does not validate: {type(exc).__name__}"]
            if problems:
                receiver.problems.extend(problems)
                self._outcome(422, "invalid")
                return
            receiver.received.append((method, self.path, body))
            if method == "POST":
                entries = [
                    {
                        "response": {
                            "status": "201 Created",
                            "location": f"{e['resource']['resourceType']}/{i}/_history/1",
                        }
                    }
                    for i, e in enumerate(body["entry"], start=1)
                ]
                self._answer(
                    200,
                    {"resourceType": "Bundle", "type": "transaction-response", "entry": entries},
                )
            else:
                self._answer(201, body, Location="DiagnosticReport/77/_history/1")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

    return Handler


@pytest.fixture
def fhir_server() -> Iterator[tuple[str, FhirReceiver]]:
    receiver = FhirReceiver()
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(receiver))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/fhir", receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
