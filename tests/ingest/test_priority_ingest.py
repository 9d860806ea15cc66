"""Job priority from the order (issue #24 item 6): Requested Procedure Priority (0040,1003)
and the site's ``priority_rules`` set the priority of the job a received study gets, so a
STAT study is drafted before the routine ones queued ahead of it.

Real pynetdicom associations to the node's SCP, a real database (SQLite; PostgreSQL where a
server answers) and the worker's own claim query.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import select

from integration.priority import PriorityRule
from integration.status import StoreStatus
from node.db import jobs as jobs_db
from node.db import views as views_db
from node.db import withdrawals as withdrawals_db
from node.db.models import Job, JobState
from node.runtime.header import header_priority, read_header
from node.settings import ConfigError, load_settings
from tests.ingest.conftest import (
    RunningSCP,
    complete_studies,
    cxr_dataset,
    start_scp,
    store,
    store_file,
    study_jobs,
    write,
)

pytestmark = pytest.mark.integration

ED_AET = "ED_CR1"
RULES = [
    {"when": {"CallingAETitle": "ED_*"}, "priority": 75},
    {"when": {"InstitutionalDepartmentName": "*emergency*"}, "priority": 60},
]


def start_node(tmp_path: Path, database_url: str, **overrides: Any) -> RunningSCP:
    """The node's SCP (``tests.ingest.conftest.start_scp``) that also admits :data:`ED_AET`."""
    return start_scp(tmp_path, database_url, allowed_aes=f"PACS, {ED_AET}", **overrides)


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[RunningSCP]:
    """The SCP with :data:`RULES`, on SQLite and (marked postgres) PostgreSQL."""
    n = start_node(tmp_path, db_url, priority_rules=RULES)
    yield n
    n.stop()


def ordered(
    *,
    priority: str | None = None,
    in_request: list[str] | None = None,
    study_uid: str | None = None,
    **attrs: Any,
) -> Dataset:
    """A chest DX instance with the order's priority at the top level and/or in the
    Request Attributes Sequence (one item per value), and other attributes."""
    ds = cxr_dataset(study_uid=study_uid)
    if priority is not None:
        ds.RequestedProcedurePriority = priority
    if in_request is not None:
        items = []
        for i, value in enumerate(in_request):
            item = Dataset()
            item.RequestedProcedureID = f"RP{i}"
            item.RequestedProcedurePriority = value
            items.append(item)
        ds.RequestAttributesSequence = Sequence(items)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def priority_of(node: RunningSCP, study_uid: str) -> int:
    """The priority of the study's only job."""
    [job] = study_jobs(node, study_uid)
    return job.priority


def complete(node: RunningSCP) -> list[int]:
    """Complete every receiving study (quiet period over); return the queued job ids."""
    return [c.job_id for c in complete_studies(node, after=5) if c.job_id is not None]


def claim(node: RunningSCP) -> Job | None:
    """The worker's claim (``node.runtime.worker`` calls ``repository.claim_next_job``)."""
    with node.session_factory() as s:
        return jobs_db.claim_next_job(s, owner="test/w0", lease_seconds=60)


# --- (a) the job priority a study gets -------------------------------------------------------


def test_order_priority_and_rules_set_the_job_priority(node: RunningSCP) -> None:
    cases = {
        "stat": (ordered(priority="STAT"), "PACS", 100),
        "stat_in_request": (ordered(in_request=["STAT"]), "PACS", 100),
        "high_lower_case": (ordered(priority="high"), "PACS", 50),
        "routine": (ordered(priority="ROUTINE"), "PACS", 0),
        "low": (ordered(priority="LOW"), "PACS", -50),
        "none": (ordered(), "PACS", 0),
        "unknown_term": (ordered(priority="URGENT"), "PACS", 0),
        "calling_ae_rule": (ordered(), ED_AET, 75),
        "rule_raises_low": (ordered(priority="LOW"), ED_AET, 75),
        "rule_never_lowers_stat": (ordered(priority="STAT"), ED_AET, 100),
        "department_rule": (
            ordered(InstitutionalDepartmentName="Adult Emergency Dept"),
            "PACS",
            60,
        ),
    }
    for name, (ds, calling, _) in cases.items():
        assert store(node, [ds], calling=calling) == [StoreStatus.SUCCESS], name
    got = {name: priority_of(node, ds.StudyInstanceUID) for name, (ds, _, _) in cases.items()}
    assert got == {name: want for name, (_, _, want) in cases.items()}


def test_without_rules_only_the_order_counts(tmp_path: Path) -> None:
    n = start_node(tmp_path, f"sqlite:///{tmp_path / 'node.sqlite3'}")
    try:
        stat, plain = ordered(priority="STAT"), ordered()
        assert store(n, [plain], calling=ED_AET) == [StoreStatus.SUCCESS]
        assert store(n, [stat]) == [StoreStatus.SUCCESS]
        assert priority_of(n, plain.StudyInstanceUID) == 0
        assert priority_of(n, stat.StudyInstanceUID) == 100
    finally:
        n.stop()


# --- (b) a STAT study is drafted before the routine queue ------------------------------------


def test_stat_study_is_claimed_before_queued_routine_studies(node: RunningSCP) -> None:
    routine = [ordered(priority="ROUTINE") for _ in range(4)] + [ordered()]
    assert store(node, routine) == [StoreStatus.SUCCESS] * 5
    queued = complete(node)
    assert len(queued) == 5
    stat = ordered(in_request=["STAT"])
    assert store(node, [stat]) == [StoreStatus.SUCCESS]
    [stat_job] = complete(node)
    with node.session_factory() as s:
        rows = {j.id: j for j in s.scalars(select(Job))}
    assert rows[stat_job].priority == 100
    assert all(rows[i].queued_at < rows[stat_job].queued_at for i in queued)  # queued later

    first = claim(node)
    assert first is not None and first.id == stat_job
    rest = [claim(node) for _ in queued]
    assert [j.id for j in rest if j is not None] == sorted(queued)  # then oldest first
    assert claim(node) is None


# --- (c) a later STAT instance raises the study's job ----------------------------------------


def test_later_stat_instance_raises_a_queued_routine_job(node: RunningSCP) -> None:
    first = ordered(priority="ROUTINE")
    study = first.StudyInstanceUID
    other = ordered(priority="ROUTINE")
    assert store(node, [first, other]) == [StoreStatus.SUCCESS] * 2
    queued = complete(node)
    [job] = study_jobs(node, study)
    assert job.id in queued and job.state is JobState.queued and job.priority == 0

    assert store(node, [ordered(priority="STAT", study_uid=study)]) == [StoreStatus.SUCCESS]
    [job] = study_jobs(node, study)  # the same job, raised, still queued
    assert (job.id, job.state, job.priority) == (job.id, JobState.queued, 100)
    assert job.id in queued
    got = claim(node)
    assert got is not None and got.id == job.id  # ahead of the study queued before it

    # a routine instance after a STAT one does not lower the job
    study2 = ordered(priority="STAT")
    assert (
        store(node, [study2, ordered(priority="LOW", study_uid=study2.StudyInstanceUID)])
        == [StoreStatus.SUCCESS] * 2
    )
    [job2] = study_jobs(node, study2.StudyInstanceUID)
    assert job2.state is JobState.received and job2.priority == 100

    # the admin's priority still rules afterwards
    with node.session_factory() as s:
        views_db.set_priority(s, job2.id, 5, actor="test")
    assert priority_of(node, study2.StudyInstanceUID) == 5


def test_stat_instance_while_receiving_raises_the_received_job(node: RunningSCP) -> None:
    plain = ordered()
    stat = ordered(priority="STAT", study_uid=plain.StudyInstanceUID)
    assert store(node, [plain, stat]) == [StoreStatus.SUCCESS] * 2
    [job] = study_jobs(node, plain.StudyInstanceUID)
    assert job.state is JobState.received and job.priority == 100


def test_late_stat_instance_of_a_finished_study_gets_a_stat_job(node: RunningSCP) -> None:
    first = ordered()
    assert store(node, [first]) == [StoreStatus.SUCCESS]
    complete(node)
    got = claim(node)
    assert got is not None
    with node.session_factory() as s:
        withdrawals_db.finish_job(s, got.id, owner="test/w0")
    late = ordered(priority="STAT", study_uid=first.StudyInstanceUID)
    assert store(node, [late]) == [StoreStatus.SUCCESS]
    done, fresh = study_jobs(node, first.StudyInstanceUID)
    assert (done.state, done.priority) == (JobState.done, 0)
    assert (fresh.state, fresh.priority) == (JobState.received, 100)


# --- robustness: the priority never fails a C-STORE ------------------------------------------


def _defined_length_sequence_file(tmp_path: Path, *, corrupt: bool) -> tuple[Path, Dataset]:
    ds = ordered(in_request=["STAT"], InstitutionalDepartmentName="Emergency")
    ds["RequestAttributesSequence"].is_undefined_length = False
    ds.RequestAttributesSequence[0].is_undefined_length_sequence_item = False
    path = write(ds, tmp_path / f"seq-{corrupt}.dcm")
    if corrupt:  # the sequence's value -> garbage (pydicom parses leniently: no priority)
        data = bytearray(path.read_bytes())
        head = b"\x40\x00\x75\x02SQ\x00\x00"
        at = data.index(head) + len(head)
        length = int.from_bytes(data[at : at + 4], "little")
        assert length < 0xFFFFFFFF and data[at + 4 : at + 8] == b"\xfe\xff\x00\xe0"
        data[at + 4 : at + 4 + length] = b"\xff" * length
        path.write_bytes(bytes(data))
    return path, ds


def test_malformed_request_attributes_sequence_is_stored_with_the_rules_priority(
    node: RunningSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, good_ds = _defined_length_sequence_file(tmp_path, corrupt=False)
    assert store_file(node, good, monkeypatch).Status == StoreStatus.SUCCESS
    assert priority_of(node, good_ds.StudyInstanceUID) == 100
    bad, bad_ds = _defined_length_sequence_file(tmp_path, corrupt=True)
    assert store_file(node, bad, monkeypatch).Status == StoreStatus.SUCCESS
    assert node.row(bad_ds.SOPInstanceUID) is not None
    assert priority_of(node, bad_ds.StudyInstanceUID) == 60  # the department rule only


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    ],
    ids=["evrle", "ivrle", "deflated", "evrbe"],
)
@pytest.mark.parametrize("seq_undefined", [True, False], ids=["seq-undef", "seq-defined"])
@pytest.mark.parametrize("item_undefined", [True, False], ids=["item-undef", "item-defined"])
def test_read_header_finds_the_priority_in_every_encoding(
    tmp_path: Path, ts: str, seq_undefined: bool, item_undefined: bool
) -> None:
    ds = ordered(in_request=["", "Stat"], StationName="ER1")
    ds["RequestAttributesSequence"].is_undefined_length = seq_undefined
    for item in ds.RequestAttributesSequence:
        item.is_undefined_length_sequence_item = item_undefined
    ds.file_meta.TransferSyntaxUID = ts
    if ts == ExplicitVRBigEndian:
        ds.save_as(
            tmp_path / "x.dcm", enforce_file_format=True, little_endian=False, implicit_vr=False
        )
    else:
        write(ds, tmp_path / "x.dcm")
    h = read_header(tmp_path / "x.dcm")
    assert h.requested_procedure_priority == ""
    assert h.request_priorities == ("Stat",)
    assert ("StationName", "ER1") in h.rule_attributes
    assert header_priority(h, calling_ae="PACS") == 100
    rule = PriorityRule(when={"StationName": "ER?"}, priority=200)
    assert header_priority(h, calling_ae="PACS", rules=[rule]) == 200


def test_a_long_request_attributes_sequence_is_walked_not_kept(tmp_path: Path) -> None:
    items = []
    for i in range(200):  # ~100 KiB: over the 64 KiB kept
        item = Dataset()
        item.RequestedProcedureDescription = "X" * 60
        item.RequestedProcedureComments = "Y" * 400
        item.RequestedProcedurePriority = "STAT" if i == 0 else "ROUTINE"
        items.append(item)
    ds = ordered(priority="HIGH")
    ds.RequestAttributesSequence = Sequence(items)
    h = read_header(write(ds, tmp_path / "long.dcm"))
    assert h.request_priorities == ()  # not read, and not refused
    assert header_priority(h, calling_ae=None) == 50  # the top-level priority still counts


# --- (d) settings ------------------------------------------------------------------------------


def test_priority_rules_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        "priority_rules = [\n"
        '  {when = {CallingAETitle = "ED*"}, priority = 100},\n'
        '  {when = {StationName = "ER?", InstitutionName = "General*"}, priority = 50},\n'
        "]\n"
        "[chest_rule]\n"
        'modalities = ["DX"]\n'
    )
    rules = load_settings(toml).priority_rules
    assert rules == [
        PriorityRule(when={"CallingAETitle": "ED*"}, priority=100),
        PriorityRule(when={"StationName": "ER?", "InstitutionName": "General*"}, priority=50),
    ]
    toml.write_text('[[priority_rules]]\nwhen = {PatientState = "critical*"}\npriority = 80\n')
    assert load_settings(toml).priority_rules == [
        PriorityRule(when={"PatientState": "critical*"}, priority=80)
    ]
    monkeypatch.delenv("CXR_NODE_CONFIG", raising=False)
    monkeypatch.delenv("CXR_NODE_PRIORITY_RULES", raising=False)
    assert load_settings().priority_rules == []  # default: none


def test_priority_rules_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CXR_NODE_PRIORITY_RULES",
        json.dumps([{"when": {"RequestingService": "ICU"}, "priority": 90}]),
    )
    settings = load_settings()
    assert settings.priority_rules == [PriorityRule(when={"RequestingService": "ICU"}, priority=90)]
    assert settings.public_summary()["priority_rules"] == [
        {"when": {"RequestingService": "ICU"}, "priority": 90}
    ]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"when": {"Modality": "DX"}, "priority": 10}], r"unknown field\(s\) Modality"),
        ([{"when": {"StationName": "ER1"}, "priority": 5000}], "outside -1000..1000"),
        ([{"when": {"StationName": "ER1"}, "priority": "100"}], "must be an integer"),
        ([{"when": {"StationName": "ER1"}, "priority": 1.5}], "must be an integer"),
        ([{"when": {"StationName": "ER1"}, "priority": True}], "must be an integer"),
        ([{"when": {"StationName": "ER1"}, "prio": 100}], "unknown key"),
        ([{"when": {}, "priority": 100}], "non-empty table"),
        ([{"when": {"StationName": ""}, "priority": 100}], "non-empty pattern"),
        ([{"priority": 100}], "needs both"),
        (["ED*"], "must be a table"),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_priority_rules_are_refused_by_name(rules: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(priority_rules=rules)
    assert str(info.value).startswith("priority_rules")


def test_bad_priority_rule_in_the_environment_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CXR_NODE_PRIORITY_RULES", '[{"when": {"CallingAETitle": "ED*"}, "priority": -2000}]'
    )
    with pytest.raises(ConfigError, match=r"^priority_rules\[0\]: priority -2000 is outside"):
        load_settings()
