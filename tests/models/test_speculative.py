"""The n-gram drafter of speculative decoding (pure Python; the engine's use of it is
tested in tests/llamacpp)."""

from __future__ import annotations

import pytest

from models.backends.speculative import (
    NgramDrafter,
    Replay,
    batch_replay_summary,
    pass_cost,
    replay,
    replay_batch,
    replay_batches,
    replay_summary,
)
from models.layout import END_ID

PROMPT_TAIL = [90, 91, 92, 93]  # stands for "### Response:\n"


def test_proposes_what_followed_an_earlier_occurrence_in_the_sequence() -> None:
    d = NgramDrafter(max_tokens=3, ngram=(2, 3), memory=0)
    seq = d.sequence([*PROMPT_TAIL, 1, 2, 3, 4, 5, 6])
    assert d.propose(seq) == []  # the tail (5, 6) occurred only as the tail itself
    seq.extend([1, 2])
    assert d.propose(seq) == [3, 4, 5]
    assert d.propose(seq, limit=1) == [3]
    assert d.propose(seq, limit=0) == []
    seq.extend([3, 4, 5, 6])  # near the end: only what is known
    seq.extend([1, 2, 3, 4])
    assert d.propose(seq) == [5, 6, 1]


def test_longest_ngram_wins() -> None:
    d = NgramDrafter(max_tokens=2, ngram=(1, 3), memory=0)
    # "8" was followed by 20 last, but "7 8" by 10
    seq = d.sequence([7, 8, 10, 11, 5, 8, 20, 21, 7, 8])
    assert d.propose(seq) == [10, 11]
    seq = d.sequence([7, 8, 10, 11, 5, 8, 20, 21, 9, 8])
    assert d.propose(seq) == [20, 21]  # only the 1-gram matches: its latest occurrence


def test_remembered_reports_start_the_next_one() -> None:
    d = NgramDrafter(max_tokens=4, ngram=(2, 4), memory=8, context=4)
    report = [100, 101, 102, 103, 104, 105]
    d.remember([5, 6, 7, *PROMPT_TAIL], report)
    assert len(d) == 1
    seq = d.sequence([8, 9, *PROMPT_TAIL])  # another study, the same template tail
    assert d.propose(seq) == [100, 101, 102, 103]
    seq.extend([100, 101, 102, 103])
    assert d.propose(seq) == [104, 105]
    # a report that diverged: the lookup follows the diverging tail
    d.remember([*PROMPT_TAIL], [100, 101, 200, 201, 202])
    seq = d.sequence([*PROMPT_TAIL, 100, 101])
    assert d.propose(seq) == [200, 201, 202]  # the newer report wins for the same key
    seq.extend([102])
    assert d.propose(seq) == [103, 104, 105]  # (101, 102) only in the older one
    d.forget()
    assert len(d) == 0 and d.propose(d.sequence([*PROMPT_TAIL])) == []


def test_own_sequence_before_memory_at_equal_length() -> None:
    d = NgramDrafter(max_tokens=2, ngram=(2, 2), memory=4)
    d.remember([], [1, 2, 50, 51])
    seq = d.sequence([1, 2, 60, 61, 1, 2])
    assert d.propose(seq) == [60, 61]


def test_memory_is_bounded_and_forgets_the_oldest() -> None:
    d = NgramDrafter(max_tokens=1, ngram=(2, 2), memory=4, context=0)
    for r in range(10):
        d.remember([], [1000 + r, 1, 2, 3000 + r])
    assert len(d) <= 4
    # the newest report's continuation of (1, 2); the oldest is gone
    assert d.propose(d.sequence([1, 2])) == [3009]
    assert d.propose(d.sequence([1000, 1])) == []
    assert d.propose(d.sequence([1009, 1])) == [2]
    d0 = NgramDrafter(memory=0)
    d0.remember([1], [2, 3, 4])
    assert len(d0) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"ngram": (0, 2)}, {"ngram": (3, 2)}, {"memory": -1}, {"context": -1}],
)
def test_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        NgramDrafter(**kwargs)  # type: ignore[arg-type]


END = 99  # stands for "### End"


def test_proposals_stop_before_an_id_at_or_above_max_id() -> None:
    d = NgramDrafter(max_tokens=4, ngram=(2, 2), memory=4, max_id=50)
    d.remember([], [1, 2, 3, 60, 4])
    assert d.propose(d.sequence([1, 2])) == [3]
    assert d.propose(d.sequence([2, 3])) == []
    assert NgramDrafter(max_tokens=4, ngram=(2, 2), memory=4).propose(d.sequence([2, 3])) == []
    d2 = NgramDrafter(max_tokens=4, ngram=(2, 2), memory=4)
    d2.remember([], [1, 2, 3, 60, 4])
    assert d2.propose(d2.sequence([1, 2])) == [3, 60, 4]


def test_replay_counts_the_steps_of_a_known_output() -> None:
    """Walked by hand: the first report finds its own repeats; the same report again is
    proposed from memory, three tokens kept in one step."""
    d = NgramDrafter(max_tokens=3, ngram=(2, 2), memory=4, context=2)
    out = [1, 2, 3, 1, 2, 3, END]
    first = replay(d, [90, 91], out, stop_ids={END})
    # after "1 2" (second time) the own text proposes "3 1" (two left before max_new): 3 kept
    assert first.step_tokens == [1, 1, 1, 1, 3]
    assert (first.new_tokens, first.plain_steps, first.proposed, first.accepted) == (6, 6, 2, 1)
    assert len(d) == 1
    again = replay(d, [90, 91], out, stop_ids={END})
    # "91 1" proposes "2 3 1" from memory (all kept), then "1 2" proposes "3 1" (3 kept)
    assert again.step_tokens == [4, 3] and again.step_accepted == [3, 1]
    assert (again.steps, again.proposed, again.accepted) == (2, 5, 4)
    assert len(d) == 2
    # not remembered on request
    replay(d, [90, 91], out, stop_ids={END}, remember=False)
    assert len(d) == 2


def test_replay_ends_on_an_accepted_stop_id_and_at_max_new() -> None:
    d = NgramDrafter(max_tokens=4, ngram=(2, 2), memory=4, context=2)
    d.remember([90, 91], [7, 8, END])
    r = replay(d, [90, 91], [7, 8, END, 5, 5], stop_ids={END})  # ids after the stop: ignored
    # "91 7" proposes "8 END": 8 kept, and the stop id ends the generation in that step
    assert r.step_tokens == [3] and (r.proposed, r.accepted, r.new_tokens) == (2, 1, 2)
    # max_new: no step after the last token; proposals never reach past it
    d = NgramDrafter(max_tokens=4, ngram=(2, 2), memory=4, context=2)
    d.remember([90, 91], [7, 8, 9, 10, 11, 12])
    r = replay(d, [90, 91], [7, 8, 9, 10, 11, 12], stop_ids={END}, max_new=3)
    assert r.step_tokens == [3] and (r.accepted, r.new_tokens, r.plain_steps) == (2, 3, 2)
    # a stop id after max_new tokens is never reached
    r = replay(d, [90, 91], [7, 8, END], stop_ids={END}, max_new=2)
    assert (r.new_tokens, r.plain_steps) == (2, 1)
    # the stop id as the first token: no decode step
    r = replay(d, [90, 91], [END], stop_ids={END})
    assert (r.steps, r.new_tokens, r.plain_steps) == (0, 0, 0)


@pytest.mark.parametrize(
    ("generated", "max_new"), [([], None), ([1, 2], 5), ([1, 2], 0), ([END], 0)]
)
def test_replay_rejects_an_output_that_could_not_have_been_generated(
    generated: list[int], max_new: int | None
) -> None:
    with pytest.raises(ValueError, match="must hold a stop id or max_new"):
        replay(NgramDrafter(), [1], generated, stop_ids={END}, max_new=max_new)


def test_step_cost_extrapolates_past_the_measured_sizes() -> None:
    d = NgramDrafter(step_costs=[1.0, 1.3, 1.6])
    assert [d.step_cost(n) for n in (1, 2, 3)] == [1.0, 1.3, 1.6]
    assert d.step_cost(5) == pytest.approx(2.2)  # 0.3 more per row, not flat
    assert NgramDrafter(step_costs=[1.0]).step_cost(9) == 1.0  # flat costs stay flat
    with pytest.raises(ValueError, match="no step_costs"):
        NgramDrafter().step_cost(2)


def _two_sequences(costs: list[float] | None) -> tuple[NgramDrafter, list[object]]:
    """A sure chain after (1, 2): 3, 4, 5; after (7, 8) a coin toss (9 or 10, the latest
    wins), then a sure 21."""
    d = NgramDrafter(max_tokens=3, ngram=(2, 2), memory=8, context=0, smoothing=0, step_costs=costs)
    d.remember([], [1, 2, 3, 4, 5])
    d.remember([], [7, 8, 9, 20])
    d.remember([], [7, 8, 10, 21])
    return d, [d.sequence([1, 2]), d.sequence([7, 8])]


def test_proposals_of_one_step_are_sized_together() -> None:
    """Alone, each sequence proposes what pays for its own step; decoded together, the
    step holds both, so the likeliest proposals are taken first and only while the whole
    step's expected seconds per token fall (here a step of 6 tokens costs 6x one)."""
    costs = [1.0, 1.3, 1.6, 1.9, 2.2, 6.0]
    d, (a, b) = _two_sequences(costs)
    assert d.propose(a) == [3, 4, 5]  # 1.9 / 4 tokens
    assert d.propose(b) == [10, 21]  # 1.6 / (1 + 0.5 + 0.5) tokens
    # together, rows 4 and 1 are two passes, of 2 rows and of 3 (1.3 + 1.6 = 2.9 for 5
    # tokens: 0.58 each, against 1.3 / 2 without proposals); the coin toss would make
    # them passes of 4 and 2 (1.9 + 1.3 = 3.2 for 5.5)
    assert d.plan([(a, None), (b, None)]) == [[3, 4, 5], []]
    # a at its limit: b's coin toss would be a second pass (1.3 + 1.3 for 3 tokens)
    assert d.plan([(a, 0), (b, None)]) == [[], []]
    # rows that propose nothing (sampled sequences) count as sequences of the step
    assert d.plan([(a, None)], other_rows=1) == [[3, 4, 5]]  # 1.3 + 1.6 for 5
    assert d.plan([(a, None)], other_rows=3) == [[]]  # 1.9 + 1.6 for 7 > 1.9 for 4
    # with cheap rows, equal proposals for every sequence are one pass and pay
    d, (a, b) = _two_sequences([1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 6.0])
    assert d.plan([(a, 1), (b, 1)]) == [[3], [10]]  # rows 2, 2: one pass of 4
    assert pass_cost([2, 1, 1, 1], d.step_cost) == pytest.approx(1.15 + 1.0)
    assert pass_cost([3, 1, 2, 1], d.step_cost) == pytest.approx(1.15 + 1.05 + 1.0)
    assert pass_cost([2, 2, 2], d.step_cost) == pytest.approx(1.25)
    assert pass_cost([4], d.step_cost) == pytest.approx(1.15)
    assert d.plan([]) == []
    # without costs every sequence proposes what matches
    d, (a, b) = _two_sequences(None)
    assert d.plan([(a, None), (b, None)]) == [[3, 4, 5], [10, 21]]


def test_equal_chances_go_to_the_nearer_proposals_first() -> None:
    d, (a, _) = _two_sequences([1.0, 1.2, 1.4, 1.6, 5.0])
    a2 = d.sequence([1, 2])
    # 2 rows and 2 sure proposals (1.6 / 4); one for each, not both for the first
    assert d.plan([(a, None), (a2, None)]) == [[3], [3]]


def test_replay_batch_of_one_is_replay() -> None:
    out = [1, 2, 3, 1, 2, 3, 1, 2, END]
    costs = [1.0, 1.3, 1.6, 1.9]
    d1 = NgramDrafter(max_tokens=3, ngram=(2, 2), memory=4, context=2, step_costs=costs)
    d2 = NgramDrafter(max_tokens=3, ngram=(2, 2), memory=4, context=2, step_costs=costs)
    for _ in range(2):
        one = replay(d1, [90, 91], out, stop_ids={END})
        batch = replay_batch(d2, [([90, 91], out)], stop_ids={END})
        assert batch.replays == [one]
        assert batch.step_rows == one.step_tokens
        assert batch.plain_step_rows == [1] * one.plain_steps
    assert len(d1) == len(d2) == 2


def test_replay_batch_steps_every_running_sequence_together() -> None:
    """Three known outputs decoded as one batch: each step's tokens are the running
    sequences' own tokens and proposals, never past what pays (a step of 5 tokens costs
    5x one here), sequences leave when they end, and all are remembered in order."""
    costs = [1.0, 1.1, 1.2, 1.3, 5.0]
    d = NgramDrafter(max_tokens=4, ngram=(2, 2), memory=8, context=2, step_costs=costs)
    outs = [[1, 2, 3, 1, 2, 3, 1, 2, 3, END], [5, 6, 5, 6, 5, 6, END], [1, 2, END]]
    items = [([90, 91], o) for o in outs]
    first = replay_batch(d, items, stop_ids={END})
    again = replay_batch(d, items, stop_ids={END}, max_new=[None, 3, None])
    assert len(d) == 6
    for b in (first, again):
        per_step = [0] * len(b.step_rows)
        for r in b.replays:  # a sequence takes part in the batch's first steps only
            for t, n in enumerate(r.step_tokens):
                per_step[t] += n
        assert per_step == b.step_rows
        running = [sum(r.steps > t for r in b.replays) for t in range(len(b.step_rows))]
        # never more tokens than pay, unless the running sequences alone are more
        assert all(n <= max(4, m) for n, m in zip(b.step_rows, running, strict=True))
    assert [r.new_tokens for r in first.replays] == [9, 6, 2]
    assert [r.new_tokens for r in again.replays] == [9, 3, 2]
    assert first.plain_step_rows == [3, 3, 2, 2, 2, 2, 1, 1, 1]
    # remembered, the repeats go faster: fewer steps than tokens
    assert len(again.step_rows) < len(first.step_rows) <= 9
    assert again.replays[0].accepted > 0
    with pytest.raises(ValueError, match="2 bounds for 3 items"):
        replay_batch(d, items, stop_ids={END}, max_new=[1, 2])


def test_replay_batches_groups_in_order_and_summarises() -> None:
    costs = [1.0, 1.1, 1.2, 1.3, 5.0]
    d = NgramDrafter(max_tokens=4, ngram=(2, 2), memory=8, context=2, step_costs=costs)
    # replay_batches stops at the model's own stop ids
    outs = [[1, 2, 3, 1, 2, 3, 1, 2, 3, END_ID], [5, 6, 5, 6, 5, 6, END_ID], [1, 2, END_ID]]
    items = [([90, 91], o) for o in outs]
    groups = replay_batches(d, items, batch=2, max_new=150)
    assert [len(g.replays) for g in groups] == [2, 1] and len(d) == 3
    assert [r.new_tokens for g in groups for r in g.replays] == [9, 6, 2]
    fig = batch_replay_summary(groups, d.step_cost)
    steps = sum(len(g.step_rows) for g in groups)
    # plain steps: one per token, each ending on the stop id (the prefill gave the first)
    assert fig["tokens_per_step"] == (9 + 6 + 2) / steps
    assert fig["max_rows"] == max(max(g.step_rows) for g in groups) <= 4
    # plain batched decoding: 2 rows while both run, then 1; the single report's steps alone
    plain = sum(d.step_cost(n) for n in [2] * 6 + [1] * 3 + [1] * 2)
    # each step with speculation priced by its passes over the weights
    spec = sum(
        pass_cost([r.step_tokens[t] for r in g.replays if t < len(r.step_tokens)], d.step_cost)
        for g in groups
        for t in range(len(g.step_rows))
    )
    assert fig["decode_x_plain"] == pytest.approx(plain / spec) and fig["decode_x_plain"] > 1
    assert "decode_x_plain" not in batch_replay_summary(groups)
    with pytest.raises(ValueError, match="batch must be at least 1"):
        replay_batches(d, items, batch=0, max_new=150)


def test_replay_summary_prices_steps_as_the_drafter_does() -> None:
    """Past the measured sizes a step is priced by extrapolation, as the drafter sizes
    proposals, not at the last measured cost."""
    rep = Replay(new_tokens=6, plain_steps=6, step_tokens=[5, 1], step_accepted=[4, 0])
    d = NgramDrafter(step_costs=[1.0, 1.3, 1.6])
    fig = replay_summary([rep], d.step_cost)
    assert fig["tokens_per_step"] == 3.0 and fig["acceptance"] == 1.0
    assert fig["decode_x_plain"] == pytest.approx(6 / (2.2 + 1.0))  # T(5) = 1.6 + 2 x 0.3
