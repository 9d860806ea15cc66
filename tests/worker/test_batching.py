"""Batching across studies (issue 6): same text as unbatched greedy, failures isolated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.db.models import JobState
from node.runtime.modelhost import ModelHost
from node.runtime.pipeline import run_batch
from node.runtime.prepare import prepare_job
from node.runtime.worker import Worker
from tests.worker.conftest import NodeEnv, make_env, nih_pixels

NEW_TOKENS = 16

OWNER = "batch-host:1:cafe/w0"


def three_studies(env: NodeEnv) -> list[str]:
    return [
        env.add_study(view="PA", pixels=nih_pixels(0)),
        env.add_study(view="PA", pixels=nih_pixels(1)),
        env.add_study(view="AP", pixels=nih_pixels(0, flip=True)),
    ]


def test_batch_of_three_matches_unbatched_greedy(
    db_url: str, tmp_path: Path, demo_bundle: Path, model_host: ModelHost
) -> None:
    env = make_env(db_url, tmp_path, demo_bundle, generation_max_new_tokens=NEW_TOKENS)
    try:
        _batch_matches_unbatched(env, model_host)
    finally:
        env.engine.dispose()


def _batch_matches_unbatched(env: NodeEnv, model_host: ModelHost) -> None:
    three_studies(env)
    jobs = env.queue_all()
    assert len(jobs) == 3
    worker = Worker(env.context(), model_host)
    claimed = worker.claim(OWNER, 3)
    assert sorted(claimed) == sorted(jobs)

    # the reference: each study alone, greedy, same settings
    singles = {}
    for job_id in claimed:
        p = prepare_job(env.deps, job_id)
        with model_host.use() as rt:
            singles[job_id] = rt.report(p.model_input, greedy=True, max_new_tokens=NEW_TOKENS)

    outcomes = run_batch(env.deps, claimed, model_host, owner=OWNER)

    assert [o.status for o in outcomes] == ["done"] * 3, [o.error for o in outcomes]
    texts = set()
    for job_id in claimed:
        [draft] = env.drafts(job_id)
        assert draft.full_text == singles[job_id].text
        assert draft.impression == singles[job_id].impression
        assert (draft.timings or {})["batch_size"] == 3.0
        texts.add(draft.full_text)
    assert len(texts) >= 2  # the drafts depend on the images
    assert len({o.sr_uid for o in outcomes}) == 3


def test_broken_study_is_dropped_and_the_others_finish(env: NodeEnv, model_host: ModelHost) -> None:
    good1 = env.add_study(view="PA", pixels=nih_pixels(0))
    bad = env.add_study(view="PA", pixels=nih_pixels(1), broken=True)
    good2 = env.add_study(view="PA", pixels=nih_pixels(1))
    jobs = env.queue_all()
    worker = Worker(env.context(), model_host)
    claimed = worker.claim(OWNER, 3)

    outcomes = {o.job_id: o for o in run_batch(env.deps, claimed, model_host, owner=OWNER)}

    by_study = {}
    for job_id in jobs:
        with env.session_factory() as s:
            from node.db import drafts as drafts_db

            by_study[drafts_db.job_study(s, job_id).study_uid] = job_id
    assert outcomes[by_study[good1]].status == "done"
    assert outcomes[by_study[good2]].status == "done"
    assert outcomes[by_study[bad]].status == "failed"
    failed = env.job(by_study[bad])
    assert failed.state is JobState.failed and failed.attempts == 1
    assert failed.last_error is not None and "Pixel Data (7FE0,0010)" in failed.last_error
    assert env.drafts(by_study[bad]) == []
    for uid in (good1, good2):
        [draft] = env.drafts(by_study[uid])
        assert (draft.timings or {})["batch_size"] == 2.0


def test_memory_budget_caps_the_batch(model_host: ModelHost) -> None:
    cfg = json.loads((model_host.runtime.bundle.llm_dir / "config.json").read_text())
    per_seq = model_host.sequence_bytes(100)
    prompt = 302  # 45 text tokens around the 256 image ids + <, >
    kv = 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * (prompt + 100) * 4  # fp32
    assert per_seq > kv  # KV cache plus activations
    assert model_host.sequence_bytes(1000) > per_seq
    mb = 1024 * 1024
    assert model_host.max_batch_for_memory(budget_mb=0, max_new_tokens=100, limit=8) == 8
    assert model_host.max_batch_for_memory(budget_mb=1, max_new_tokens=100, limit=8) == max(
        1, min(8, mb // per_seq)
    )
    fits_three = (3 * per_seq) // mb + 1
    assert model_host.max_batch_for_memory(
        budget_mb=fits_three, max_new_tokens=100, limit=8
    ) == min(8, fits_three * mb // per_seq)
    with pytest.raises(ValueError):
        model_host.max_batch_for_memory(budget_mb=1, max_new_tokens=100, limit=0)
