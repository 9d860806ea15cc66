"""The 14 CheXpert observations and the four labels a report gives each of them."""

from __future__ import annotations

import enum


class Observation(enum.Enum):
    """A CheXpert observation, in CheXpert's order; the value is a stable snake_case key.

    The key is also the stem of the observation's phrase-list file in
    ``models/assets/chexpert`` (``mention/<key>.txt``, ``unmention/<key>.txt``).
    """

    NO_FINDING = "no_finding"
    ENLARGED_CARDIOMEDIASTINUM = "enlarged_cardiomediastinum"
    CARDIOMEGALY = "cardiomegaly"
    LUNG_OPACITY = "lung_opacity"
    LUNG_LESION = "lung_lesion"
    EDEMA = "edema"
    CONSOLIDATION = "consolidation"
    PNEUMONIA = "pneumonia"
    ATELECTASIS = "atelectasis"
    PNEUMOTHORAX = "pneumothorax"
    PLEURAL_EFFUSION = "pleural_effusion"
    PLEURAL_OTHER = "pleural_other"
    FRACTURE = "fracture"
    SUPPORT_DEVICES = "support_devices"

    @property
    def title(self) -> str:
        """CheXpert's column name, e.g. ``"Enlarged Cardiomediastinum"``."""
        return self.value.replace("_", " ").title()

    @classmethod
    def from_key(cls, key: str) -> Observation:
        """The observation for a snake_case key or a CheXpert column name."""
        return cls(key.strip().lower().replace(" ", "_"))


class Label(enum.Enum):
    """What a report says about one observation."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNCERTAIN = "uncertain"
    NOT_MENTIONED = "not_mentioned"

    @property
    def chexpert_value(self) -> float | None:
        """CheXpert's encoding: 1.0, 0.0, -1.0, and blank (``None``) for not mentioned."""
        return _CHEXPERT_VALUES[self]

    @property
    def precedence(self) -> int:
        """Rank when one report mentions an observation more than once (higher wins).

        CheXpert's aggregation: positive beats uncertain beats negative; any mention beats
        no mention.
        """
        return _PRECEDENCE[self]


_CHEXPERT_VALUES: dict[Label, float | None] = {
    Label.POSITIVE: 1.0,
    Label.NEGATIVE: 0.0,
    Label.UNCERTAIN: -1.0,
    Label.NOT_MENTIONED: None,
}
_PRECEDENCE: dict[Label, int] = {
    Label.NOT_MENTIONED: 0,
    Label.NEGATIVE: 1,
    Label.UNCERTAIN: 2,
    Label.POSITIVE: 3,
}

OBSERVATIONS: tuple[Observation, ...] = tuple(Observation)
"""All 14 observations in CheXpert's column order."""

FINDINGS: tuple[Observation, ...] = tuple(o for o in Observation if o is not Observation.NO_FINDING)
"""The 13 observations that a report mentions (No Finding is derived from them)."""
