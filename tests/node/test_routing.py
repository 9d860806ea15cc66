"""Routing rules: matching, explanations, the default chest rule set, the rules file, and
what completion, the queue and delivery do with a rule's decision."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from integration.routing import Condition, RoutingRule, RuleSet, patient_age_years
from integration.routing_file import RuleError, parse_rule_set
from node.db import jobs as jobs_db
from node.db import studies as studies_db
from node.db import study_completion as completion_db
from node.db.instance_record import InstanceRecord
from node.db.models import Job, JobState, Study, StudyState, utcnow
from node.runtime.assembly import SeriesFacts, evaluate_chest_rule
from node.runtime.modelhost import ModelHost
from node.runtime.pipeline import run_batch
from node.runtime.routing import facts_reader
from node.settings import ChestRule, ConfigError, load_settings
from node.settings.routing import default_rule_set, load_rule_set
from tests.node.factories import T0, record, uid
from tests.worker.conftest import make_cxr, make_env, model_host  # noqa: F401

PACS_A = "PACS_A@127.0.0.1:11001"
PACS_B = "PACS_B@127.0.0.1:11002"


def rules_from(text: str, **kw: object) -> RuleSet:
    import tomllib

    return parse_rule_set(tomllib.loads(text), **kw)  # type: ignore[arg-type]


# --- matching and explanations (pure) ----------------------------------------------------


def test_operators_and_negation() -> None:
    rs = rules_from(
        """
[[rules]]
name = "ed"
when = [
  { attribute = "CallingAETitle", glob = "ED_*" },
  { attribute = "Modality", equals = ["CR", "DX"] },
  { attribute = "StationName", regex = "^port(able)?" },
  { attribute = "InstitutionalDepartmentName", contains = "EMERG", not = true },
]
priority = 80
"""
    )
    facts = {
        "CallingAETitle": "ED_XR1",
        "Modality": "dx",
        "StationName": "Portable 3",
        "InstitutionalDepartmentName": "Radiology",
    }
    d = rs.evaluate([facts])
    assert d.draft and d.rule == "ed" and d.priority == 80 and d.destinations is None
    assert "CallingAETitle ED_XR1 matches ED_*" in d.reason
    assert "Portable" not in d.reason and "Radiology" not in d.reason  # free text not quoted
    d = rs.evaluate([{**facts, "InstitutionalDepartmentName": "Emergency"}])
    assert not d.draft and d.rule is None
    assert "not (InstitutionalDepartmentName contains EMERG)" in d.reason
    assert "Emergency" not in d.reason
    d = rs.evaluate([{**facts, "CallingAETitle": "WARD_1"}])
    assert d.reason == "no rule matched: rule ed: CallingAETitle WARD_1 does not match ED_*"


def test_first_match_wins_and_explains_each_rule() -> None:
    rs = rules_from(
        """
[[rules]]
name = "no-kids"
when = [{ attribute = "PatientAge", age_max = 16 }]
draft = false

[[rules]]
name = "chest-cr"
when = [{ attribute = "Modality", one_of = ["CR", "DX"] }]
model = "llm-cxr"
destinations = ["A"]

[[rules]]
name = "rest"
draft = false
""",
        destinations={"A": PACS_A},
    )
    child = {"Modality": "CR", "PatientAge": "008Y"}
    d = rs.evaluate([child])
    assert (d.draft, d.rule) == (False, "no-kids")
    assert d.reason == "rule no-kids: patient age is within ..16 years"
    assert "008" not in d.reason
    adult = {"Modality": "CR", "PatientBirthDate": "19700101", "StudyDate": "20240101"}
    d = rs.evaluate([adult])
    assert (d.draft, d.rule, d.model, d.destinations) == (True, "chest-cr", "llm-cxr", (PACS_A,))
    assert [r.rule for r in d.results] == ["no-kids", "chest-cr"]
    assert not d.results[0].matched and d.results[1].matched
    assert d.results[0].explanation == "patient age is not within ..16 years"
    d = rs.evaluate([{"Modality": "CT"}])
    assert (d.draft, d.rule) == (False, "rest")
    assert d.results[1].explanation == "Modality CT is not one of CR, DX"
    assert d.results[0].explanation.startswith("patient age is unknown")


def test_one_series_must_meet_every_condition() -> None:
    rs = RuleSet(
        (
            RoutingRule(
                "x",
                (
                    Condition("Modality", "equals", ("DX",)),
                    Condition("ViewPosition", "equals", ("PA", "AP")),
                ),
            ),
        )
    )
    two = [
        {"Modality": "DX", "ViewPosition": ("LL",)},
        {"Modality": "CT", "ViewPosition": ("AP",)},
    ]
    d = rs.evaluate(two)
    assert not d.draft
    assert "series 1: Modality DX is one of DX but ViewPosition LL is not one of PA, AP" in d.reason
    assert "series 2: Modality CT is not one of DX" in d.reason
    d = rs.evaluate([*two, {"Modality": "DX", "ViewPosition": ("LL", "PA")}])
    assert d.draft and d.results[0].series == 2


def test_patient_age() -> None:
    assert patient_age_years({"PatientAge": "006M"}) == 0.5
    assert patient_age_years({"PatientAge": "bad", "PatientBirthDate": "20000101"}) is None
    age = patient_age_years({"PatientBirthDate": "20000101", "StudyDate": "20200101"})
    assert age is not None and 19.9 < age < 20.1
    assert patient_age_years({"PatientBirthDate": "20200101", "StudyDate": "20000101"}) is None


# --- the default rule set is the chest rule ------------------------------------------------

CASES = [
    ("CR", "CHEST", None, None),
    ("DX", "THORAX", None, None),
    ("DX", None, "PA Lungs", None),
    ("DX", None, None, "XR CHEST 2 VIEWS"),
    ("CT", "CHEST", None, "CT CHEST"),
    ("DX", "HAND", "Hand AP", "XR HAND"),
    ("CR", None, None, None),
    (None, "CHEST", None, None),
    ("cr", "chest", None, None),
    ("MR", None, "cxr", None),
]
CHESTS = [
    ChestRule(),
    ChestRule(modalities=["DX"], require_keyword=False),
    ChestRule(match_descriptions=False),
    ChestRule(keywords=["LUNG"]),
]


@pytest.mark.parametrize("chest", CHESTS)
def test_default_rule_set_decides_as_the_chest_rule(chest: ChestRule) -> None:
    rs = default_rule_set(chest)
    for combo in itertools.chain(([c] for c in CASES), itertools.combinations(CASES, 2)):
        for study_desc in (None, "CHEST PA", "ABDOMEN"):
            series = [SeriesFacts(m, b, sd) for m, b, sd, _ in combo]
            want = evaluate_chest_rule(chest, study_description=study_desc, series=series)
            facts = [
                {
                    "Modality": s.modality,
                    "BodyPartExamined": s.body_part_examined,
                    "SeriesDescription": s.series_description,
                    "StudyDescription": study_desc,
                }
                for s in series
            ]
            got = rs.evaluate(facts)
            assert got.draft is want.qualifies, (combo, study_desc)
            assert got.rule == ("chest" if want.qualifies else None)
            for free in ("Hand AP", "XR HAND", "PA Lungs", "CHEST PA", "ABDOMEN"):
                assert free not in got.reason
    assert rs.evaluate([]).reason == "no series received"


def test_chest_preset_in_a_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[[rules]]\nname = "chest"\npreset = "chest"\npriority = 10\n', encoding="utf-8"
    )
    rs = load_rule_set(path, chest=ChestRule(modalities=["DX"]), destinations=[])
    assert rs.evaluate([{"Modality": "DX", "BodyPartExamined": "CHEST"}]).priority == 10
    assert not rs.evaluate([{"Modality": "CR", "BodyPartExamined": "CHEST"}]).draft


# --- the rules file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '[[rules]]\nname = "a"\nwhen = [{ attribute = "Colour", equals = "X" }]\n',
            "unknown attribute 'Colour'",
        ),
        (
            '[[rules]]\nname = "a"\nwhen = [{ attribute = "StationName", regex = "(" }]\n',
            "bad regex",
        ),
        (
            '[[rules]]\nname = "a"\ndestinations = ["NOPE@h:1"]\n',
            "destination 'NOPE@h:1' is not configured",
        ),
        ('[[rules]]\nname = "a"\n[[rules]]\nname = "a"\n', "rule 'a' is defined twice"),
        ('[[rules]]\nname = "a"\ncolour = 1\n', "unexpected key(s) colour"),
        ('[[rules]]\nname = "a"\ndraft = false\npriority = 5\n', "draft = false takes no"),
        ('[[rules]]\nname = "a"\npriority = 5000\n', "-1000..1000"),
        (
            '[[rules]]\nname = "a"\n'
            'when = [{ attribute = "Modality", equals = "CR", glob = "D*" }]\n',
            "exactly one of",
        ),
        ("rules = [", "not valid TOML"),
        ("", "no rules"),
    ],
)
def test_rules_file_errors_name_the_setting(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_settings(None, routing_rules_file=path, destinations=PACS_A)
    assert "routing_rules_file" in str(exc.value) and error in str(exc.value)


def test_rules_file_missing_and_destination_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routing_rules_file: .*cannot read"):
        load_settings(None, routing_rules_file=tmp_path / "absent.toml")
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "a"\ndestinations = ["PACS_B"]\n', encoding="utf-8")
    s = load_settings(None, routing_rules_file=path, destinations=f"{PACS_A},{PACS_B}")
    assert s.routing_rules.rules[0].destinations == (PACS_B,)  # AE title -> text form
    assert s.routing_rules.source == str(path)
    with pytest.raises(RuleError):
        parse_rule_set({"rules": [{"name": "bad name!"}]})


# --- completion, the queue, delivery ---------------------------------------------------------


def from_ae(rec: InstanceRecord, calling_ae: str) -> InstanceRecord:
    """``rec`` as sent by ``calling_ae``."""
    return replace(rec, calling_ae=calling_ae)


def _sweep(
    factory: sessionmaker[Session], rules: RuleSet, spool: Path | None = None
) -> list[completion_db.CompletionResult]:
    with factory() as s:
        return completion_db.complete_quiet_studies(
            s,
            quiet_seconds=10,
            max_wait_seconds=600,
            now=T0 + timedelta(seconds=60),
            rule=ChestRule(),
            rules=rules,
            facts_of=facts_reader(rules, spool),
        )


ROUTED = rules_from(
    """
[[rules]]
name = "ed-chest"
preset = "chest"
when = [{ attribute = "CallingAETitle", equals = "ED_XR" }]
priority = 70
model = "llm-cxr-demo"
destinations = ["PACS_B"]

[[rules]]
name = "no-hands"
when = [{ attribute = "BodyPartExamined", equals = "HAND" }]
draft = false

[[rules]]
name = "chest"
preset = "chest"
""",
    presets={"chest": default_rule_set(ChestRule()).rules[0].conditions},
    destinations={"PACS_B": PACS_B, PACS_A: PACS_A, PACS_B + "": PACS_B},
)


def test_completion_applies_the_matching_rule(session_factory: sessionmaker[Session]) -> None:
    ed, ward, hand = uid(), uid(), uid()
    with session_factory() as s:
        studies_db.record_instance(s, from_ae(record(study=ed, priority=100), "ED_XR"))
    with session_factory() as s:
        studies_db.record_instance(s, from_ae(record(study=ward, priority=0), "WARD"))
    with session_factory() as s:
        studies_db.record_instance(s, record(study=hand, body_part="HAND"))
    results = {r.study_uid: r for r in _sweep(session_factory, ROUTED)}
    assert results[hand].state is StudyState.skipped
    assert results[hand].reason == "rule no-hands: BodyPartExamined HAND is one of HAND"
    with session_factory() as s:
        jobs = {j.study.study_instance_uid: j for j in s.scalars(select(Job).join(Study))}
        e, w, h = jobs[ed], jobs[ward], jobs[hand]
        # priority: the higher of the ingest priority (STAT 100) and the rule's (70)
        assert (e.state, e.rule, e.model, e.destinations, e.priority) == (
            JobState.queued,
            "ed-chest",
            "llm-cxr-demo",
            [PACS_B],
            100,
        )
        assert (w.state, w.rule, w.model, w.destinations, w.priority) == (
            JobState.queued,
            "chest",
            None,
            None,
            0,
        )
        assert h.state is JobState.cancelled and h.rule == "no-hands"
        assert h.last_error == "study skipped: rule no-hands: BodyPartExamined HAND is one of HAND"
        st = s.scalars(select(Study).where(Study.study_instance_uid == hand)).one()
        assert st.skip_reason == "rule no-hands: BodyPartExamined HAND is one of HAND"


def test_rule_priority_raises_a_routine_study(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(s, from_ae(record(study=study), "ED_XR"))
    (res,) = _sweep(session_factory, ROUTED)
    with session_factory() as s:
        job = s.get(Job, res.job_id)
        assert job is not None and job.priority == 70


def _write_header(path: Path, *, station: str, birth: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.StationName = station
    ds.PatientBirthDate = birth
    ds.StudyDate = "20240601"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_header_attributes_are_read_from_the_spool(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    rules = rules_from(
        """
[[rules]]
name = "portable-kids"
when = [
  { attribute = "StationName", glob = "PORT*" },
  { attribute = "PatientAge", age_max = 18 },
]
draft = false

[[rules]]
name = "all"
"""
    )
    assert rules.needs_header
    kid, adult = uid(), uid()
    for study, birth in ((kid, "20200101"), (adult, "19600101")):
        rel = f"{study}/1/a.dcm"
        _write_header(tmp_path / rel, station="PORTABLE1", birth=birth)
        with session_factory() as s:
            studies_db.record_instance(s, record(study=study, spool_path=rel))
    results = {r.study_uid: r for r in _sweep(session_factory, rules, spool=tmp_path)}
    assert results[kid].state is StudyState.skipped
    assert results[kid].reason == (
        "rule portable-kids: StationName matches PORT*; patient age is within ..18 years"
    )
    assert results[adult].state is StudyState.complete
    assert "PORTABLE1" not in results[kid].reason


def test_a_job_for_another_model_is_not_claimed(session_factory: sessionmaker[Session]) -> None:
    study = uid()
    with session_factory() as s:
        studies_db.record_instance(s, from_ae(record(study=study), "ED_XR"))
    (res,) = _sweep(session_factory, ROUTED)
    now = T0 + timedelta(seconds=61)
    with session_factory() as s:
        assert jobs_db.claim_next_job(s, owner="w", lease_seconds=5, now=now) is None
        assert jobs_db.claim_next_job(s, owner="w", lease_seconds=5, now=now, model="other") is None
    with session_factory() as s:
        job = jobs_db.claim_next_job(s, owner="w", lease_seconds=5, now=now, model="llm-cxr-demo")
        assert job is not None and job.id == res.job_id


def test_a_routed_study_is_delivered_only_to_its_destinations(
    tmp_path: Path,
    model_host: ModelHost,  # noqa: F811
    demo_bundle: Path,
) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(
        '[[rules]]\nname = "to-b"\npreset = "chest"\ndestinations = ["PACS_B"]\n',
        encoding="utf-8",
    )
    env = make_env(
        f"sqlite:///{tmp_path / 'node.sqlite3'}",
        tmp_path,
        demo_bundle,
        destinations=f"{PACS_A},{PACS_B}",
        routing_rules_file=rules_file,
    )
    try:
        env.add_study()
        with env.session_factory() as s:
            (res,) = completion_db.complete_quiet_studies(
                s,
                quiet_seconds=1.0,
                max_wait_seconds=600.0,
                now=utcnow() + timedelta(seconds=5),
                rule=env.settings.chest_rule,
                rules=env.settings.routing_rules,
                facts_of=facts_reader(env.settings.routing_rules, env.settings.spool_dir),
            )
        assert res.job_id is not None
        with env.session_factory() as s:
            job = jobs_db.claim_next_job(s, owner="w1", lease_seconds=60)
            assert job is not None and job.id == res.job_id
        [outcome] = run_batch(env.deps, [res.job_id], model_host, owner="w1")
        assert outcome.status == "done", outcome
        rows = env.deliveries(res.job_id)
        assert rows and {r.destination for r in rows} == {PACS_B}
        assert env.job(res.job_id).rule == "to-b"
    finally:
        env.engine.dispose()
