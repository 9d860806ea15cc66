"""Mention and unmention phrases: CheXpert's lists (package data) and this node's additions.

CheXpert's lists ship in ``models/assets/chexpert/{mention,unmention}/<key>.txt`` (MIT,
Stanford Machine Learning Group; ``LICENSE-chexpert-labeler.txt`` beside them), one phrase a
line, copied unchanged. ``mention/no_finding.txt`` is not a list of normal statements: it
lists *other* findings (emphysema, scoliosis, granuloma, ...) that, when present, stop a
report from being "No Finding" without being one of the 13 findings themselves.

How a phrase matches, as CheXpert's extractor does with two differences:

- Case-insensitive, on the normalised sentence. A phrase is a prefix: ``atelecta`` matches
  "atelectasis" and "atelectatic", ``effusion`` matches "effusions". An underscore in the
  file stands for a space, so ``drain_`` matches the word "drain" but not "drainage".
- **Difference 1:** a phrase must start at a word boundary (CheXpert matches anywhere in a
  word, so ``scar`` would match "oscar"; ``_mediastinum`` in its list already asks for one).
  Compound words that CheXpert found inside longer words are added back as
  :data:`EXTRA_MENTIONS` (``cardiomediastinal silhouette``, ``hydropneumothorax``), with
  "heart is enlarged" and its like (CheXpert needs "the heart" or "heart size").
- A match that overlaps an unmention phrase of the same observation is dropped
  (``pericardial effusion`` is not a pleural effusion, ``massive`` is not a mass). CheXpert
  adds positional unmentions for the heart and mediastinum in code ("over the heart", "in
  the left mediastinum": a line or device seen over the heart says nothing about its size);
  :func:`positional_unmentions` builds the same list.
- **Difference 2:** :data:`EXTRA_UNMENTIONS` drops a few prefix matches that CheXpert gets
  wrong in chest reports: "plate-like atelectasis" is no plate, "Kerley B lines", "septal
  lines" and the "pleural line" of a pneumothorax are no lines or tubes, "tuberculosis" and
  "tuberosity" are no tubes, a "diaphragmatic contour" says nothing about the mediastinum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources

from models.labeler.observations import FINDINGS, Observation

ASSETS_PACKAGE = "models.assets"
PHRASES_DIR = "chexpert"
"""Folder of ``models.assets`` that holds ``mention/`` and ``unmention/``."""

OTHER_FINDINGS_KEY = Observation.NO_FINDING.value
"""The file that lists CheXpert's "other findings" (``mention/no_finding.txt``)."""

EXTRA_MENTIONS: dict[Observation, tuple[str, ...]] = {
    Observation.CARDIOMEGALY: tuple(
        f"heart {verb} {degree}enlarged"
        for verb in ("is", "appears", "remains")
        for degree in ("", "mildly ", "moderately ", "markedly ", "severely ")
    ),
    Observation.ENLARGED_CARDIOMEDIASTINUM: (
        "cardiomediastinal silhouette",
        "cardiomediastinal configuration",
        "mediastinal widening",
    ),
    Observation.PNEUMOTHORAX: ("hydropneumothora", "hemopneumothora", "pyopneumothora"),
}
"""Mentions added to CheXpert's lists (see the module docstring, difference 1)."""

EXTRA_UNMENTIONS: dict[Observation, tuple[str, ...]] = {
    Observation.SUPPORT_DEVICES: (
        "plate-like",
        "plate like",
        "platelike",
        "kerley b line",
        "kerley line",
        "septal line",
        "pleural line",
        "tubercul",
        "tuberosit",
    ),
    Observation.ENLARGED_CARDIOMEDIASTINUM: (
        "diaphragmatic contour",
        "hemidiaphragmatic contour",
        "contour of the diaphragm",
        "contour of the hemidiaphragm",
    ),
}
"""Unmentions added to CheXpert's lists (see the module docstring, difference 2)."""

_POSITIONS = ("over the", "overly the", "in the")
_SIDES = ("", " superior", " left", " right")


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Compile a list phrase: word boundary in front, a prefix unless it ends in ``_``."""
    whole_word = phrase.endswith("_")
    words = phrase.replace("_", " ").split()
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(r"(?<![a-z0-9])" + body + (r"(?![a-z0-9])" if whole_word else ""))


def read_phrase_file(kind: str, key: str) -> tuple[str, ...]:
    """The phrases of ``models/assets/chexpert/<kind>/<key>.txt`` (none if it is absent)."""
    path = resources.files(ASSETS_PACKAGE).joinpath(PHRASES_DIR, kind, f"{key}.txt")
    if not path.is_file():
        return ()
    lines = (line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def positional_unmentions(mentions: tuple[str, ...], *, drop_the: bool) -> tuple[str, ...]:
    """CheXpert's positional unmentions ("over the left heart") for the given mentions."""
    out = []
    for position in _POSITIONS:
        for side in _SIDES:
            for mention in mentions:
                target = mention.replace("the ", "") if drop_the else mention
                out.append(f"{position}{side} {target.replace('_', ' ').strip()}")
    return tuple(out)


@dataclass(frozen=True)
class PhraseLists:
    """Compiled mention and unmention patterns per observation, and the other findings."""

    mentions: dict[Observation, tuple[re.Pattern[str], ...]]
    unmentions: dict[Observation, tuple[re.Pattern[str], ...]]
    other_findings: tuple[re.Pattern[str], ...]
    sizes: dict[str, int] = field(default_factory=dict)
    """Number of phrases per source (for the documentation and the tests)."""


def load_phrase_lists() -> PhraseLists:
    """Read CheXpert's lists from package data and add this node's extras."""
    mentions: dict[Observation, tuple[re.Pattern[str], ...]] = {}
    unmentions: dict[Observation, tuple[re.Pattern[str], ...]] = {}
    sizes: dict[str, int] = {}
    raw: dict[Observation, tuple[str, ...]] = {}
    for obs in FINDINGS:
        raw[obs] = read_phrase_file("mention", obs.value)
        sizes[f"mention/{obs.value}"] = len(raw[obs])
    if not any(raw.values()):
        raise FileNotFoundError(
            f"no CheXpert phrase lists in {ASSETS_PACKAGE}/{PHRASES_DIR}: is the package data "
            "installed?"
        )
    for obs in FINDINGS:
        un = read_phrase_file("unmention", obs.value)
        sizes[f"unmention/{obs.value}"] = len(un)
        if obs is Observation.CARDIOMEGALY:
            keep = tuple(m for m in raw[obs] if m not in ("cardiomegaly", "cardiac enlargement"))
            un += positional_unmentions(keep, drop_the=True)
        elif obs is Observation.ENLARGED_CARDIOMEDIASTINUM:
            un += positional_unmentions(raw[obs], drop_the=False)
        un += EXTRA_UNMENTIONS.get(obs, ())
        phrases = raw[obs] + EXTRA_MENTIONS.get(obs, ())
        mentions[obs] = tuple(phrase_pattern(p) for p in phrases)
        unmentions[obs] = tuple(phrase_pattern(p) for p in un)
    other = read_phrase_file("mention", OTHER_FINDINGS_KEY)
    sizes[f"mention/{OTHER_FINDINGS_KEY}"] = len(other)
    return PhraseLists(mentions, unmentions, tuple(phrase_pattern(p) for p in other), sizes)
