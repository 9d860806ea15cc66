"""Negation and uncertainty triggers, pseudo-triggers and scope terminators (data only).

NegEx/ConText-style cues in the spirit of CheXpert's NegBio patterns, written as phrases
because the node has no dependency parser. :mod:`models.labeler.context` applies them; the
rules are summarised here and in ``docs/labeler.md``.

- A **trigger** is a phrase (matched case-insensitively at word boundaries, spaces standing
  for any white space) with a cue (negation or uncertainty) and a direction: *forward*
  (pre-trigger: "no pneumothorax"), *backward* (post-trigger: "effusion has resolved") or
  *both* ("pneumonia versus atelectasis"). Its scope runs from the trigger to the end of the
  clause, or at most ``forward`` / ``backward`` words when those are set.
- Overlapping triggers: the longest wins, so "cannot be excluded" (uncertain) beats
  "excluded" (negative), "no new" (uncertain, as in CheXpert) beats "no", and a
  **pseudo-trigger** ("no change", "normal position", "nearly resolved") beats the trigger
  inside it and itself does nothing.
- A scope ends at a **terminator** ("but", "however", "which", "there is", ...), at ``;``
  ``:`` ``(`` ``)``, at the end of the sentence, and at a trigger of the other cue unless
  that trigger is *weak* ("or", "and/or", "to suggest"). Backward scopes, and forward
  scopes with a word limit, also end at a comma: "small effusion, not pneumothorax" and
  "heart size is normal, small effusion" leave the effusion positive. Open forward scopes
  do not, so "no pneumothorax, effusion, or consolidation" negates all three.
- When triggers of both cues reach one mention, negation wins (NegBio's order).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Cue(enum.Enum):
    """What a trigger does to the mentions in its scope."""

    NEGATION = "negation"
    UNCERTAINTY = "uncertainty"
    PSEUDO = "pseudo"


class Direction(enum.Enum):
    """Which side of the trigger its scope covers."""

    FORWARD = "forward"
    BACKWARD = "backward"
    BOTH = "both"


BACKWARD_WORDS = 5
"""Default reach of a backward scope: the mention must end within this many words."""


@dataclass(frozen=True)
class Trigger:
    """One cue phrase.

    ``forward`` / ``backward`` bound the scope in words (``None``: to the end of the clause);
    ``weak`` triggers do not end the scope of a trigger of the other cue.
    """

    phrase: str
    cue: Cue
    direction: Direction
    forward: int | None = None
    backward: int | None = BACKWARD_WORDS
    weak: bool = False


def _many(
    cue: Cue,
    direction: Direction,
    phrases: str,
    *,
    forward: int | None = None,
    backward: int = BACKWARD_WORDS,
) -> tuple[Trigger, ...]:
    return tuple(
        Trigger(p.strip(), cue, direction, forward, backward)
        for p in phrases.split("|")
        if p.strip()
    )


_N, _U, _P = Cue.NEGATION, Cue.UNCERTAINTY, Cue.PSEUDO
_F, _B, _BOTH = Direction.FORWARD, Direction.BACKWARD, Direction.BOTH

NEGATION_TRIGGERS: tuple[Trigger, ...] = (
    *_many(
        _N,
        _F,
        "no | without | negative for | free of | clear of | absence of | no evidence of "
        "| no sign of | no signs of | no findings of | rather than | resolution of "
        "| removal of | clearing of | disappearance of",
    ),
    *_many(_N, _BOTH, "no longer | rule out | ruled out"),
    # "not": "there is not a pneumothorax", "pneumothorax is not seen", "heart is not enlarged"
    Trigger("not", _N, _BOTH, forward=3, backward=4),
    # normal statements and "has resolved" reach only a few words
    *_many(_N, _BOTH, "normal | unremarkable | resolved | cleared | removed", forward=3),
    *_many(_N, _B, "absent | excluded | within normal limits | resolution"),
    *_many(_N, _B, "upper limit of normal | upper limits of normal", backward=7),
)
"""Negation cues ("no pneumothorax", "without evidence of effusion", "effusion has resolved",
"normal heart size")."""

UNCERTAINTY_TRIGGERS: tuple[Trigger, ...] = (
    *_many(
        _U,
        _F,
        "may | might | could | possible | possibly | probable | probably | likely "
        "| presumed | presumably | presumptive | questionable | question of | suspect "
        "| suspicious for | suspicious of | suspicion for | suspicion of | concerning for "
        "| concern for | worrisome for | suggestive of | suggest | suggests | suggesting "
        "| suggested | consider | differential | favor | favored | favoring "
        "| favour | favoured | cannot exclude | can not exclude | can't exclude "
        "| cannot rule out | can not rule out | can't rule out | equivocal | indeterminate "
        "| no new | secondary to | correlate clinically for",
    ),
    *_many(
        _U, _BOTH, "suspected | considered | versus | vs | is likely | are likely | not excluded"
    ),
    *_many(
        _U,
        _B,
        "cannot be excluded | can not be excluded | could not be excluded "
        "| cannot be ruled out | can not be ruled out | not ruled out | is possible "
        "| are possible | is questioned | poorly evaluated | not well evaluated "
        "| incompletely evaluated | not well visualized | not well seen | not clearly seen "
        "| cannot be assessed | cannot be evaluated | may be present | might be present "
        "| could be present",
    ),
    *_many(_U, _BOTH, "borderline | obscured", forward=3, backward=3),
    *_many(_U, _F, "obscuring | obscures | obscuration of", forward=3),
    # "pneumonia or atelectasis", "effusion and/or thickening": CheXpert's "XXX or YYY" rule;
    # weak, so "no pneumothorax or effusion" stays negative
    Trigger("or", _U, _BOTH, forward=3, backward=3, weak=True),
    Trigger("and/or", _U, _BOTH, forward=3, backward=3, weak=True),
    # "opacity to suggest pneumonia" is hedged; "no consolidation to suggest pneumonia" is not
    Trigger("to suggest", _U, _F, weak=True),
)
"""Uncertainty cues ("may represent atelectasis", "pneumothorax cannot be excluded",
"consolidation versus atelectasis"); CheXpert counts "likely" as uncertain."""

PSEUDO_TRIGGERS: tuple[Trigger, ...] = _many(
    _P,
    _BOTH,
    "no change | no significant change | no interval change | no definite change "
    "| not changed | not significantly changed | has not changed | have not changed "
    "| without change | without interval change | without significant change "
    "| no increase | no significant increase | no decrease | not only | gram negative "
    "| normal position | normal positioning | normal location | normal course "
    "| nearly resolved | partially resolved | almost resolved | incompletely resolved "
    "| mostly resolved | largely resolved | not resolved | not completely resolved "
    "| not fully resolved | not entirely resolved | not yet resolved",
)
"""Phrases that contain a trigger word but negate nothing: "no change in the effusion"
leaves the effusion present, "tube in normal position" leaves the tube there."""

TRIGGERS: tuple[Trigger, ...] = NEGATION_TRIGGERS + UNCERTAINTY_TRIGGERS + PSEUDO_TRIGGERS

TERMINATORS: tuple[str, ...] = (
    "but",
    "however",
    "although",
    "though",
    "except",
    "apart from",
    "aside from",
    "other than",
    "which",
    "whereas",
    "while",
    "yet",
    "nevertheless",
    "otherwise",
    "there is",
    "there are",
    "there was",
    "there were",
    "there has been",
    "there have been",
    "and the",
)
"""Words that end a scope: "no pneumothorax but a small effusion"."""

TERMINATOR_PUNCTUATION = ";:()"
"""Characters that end every scope (a sentence end ends it too)."""
