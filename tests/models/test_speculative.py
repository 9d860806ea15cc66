"""The n-gram drafter of speculative decoding (pure Python; the engine's use of it is
tested in tests/llamacpp)."""

from __future__ import annotations

import pytest

from models.backends.speculative import NgramDrafter, replay

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
