"""Pick the frontal (PA/AP) chest image of a study.

LLM-CXR was evaluated on frontal views only (View Position PA or AP). The view of each
instance is read, in order of trust, from:

1. View Position (0018,5101) (PS3.3 C.8.11.5 DX Positioning module; C.8.1.1 CR Series):
   defined terms AP, PA, LL, RL, RLD, LLD, RLO, LLO, plus LATERAL / LAT seen in practice;
2. View Code Sequence (0054,0220) (PS3.3 C.8.11.5, CID 4010 "DX View"): SCT 272479007
   postero-anterior, SCT 399348003 antero-posterior, the lateral/oblique codes, also
   the legacy SNOMED-RT codes (R-10214, R-10206) and the Code Meaning text;
3. descriptive text: Series Description (0008,103E), Acquisition Device Processing
   Description (0018,1400), Protocol Name (0018,1030), Image Comments (0020,4000).

Lateral, oblique and decubitus views are excluded. Among frontal images the configured order
(default PA before AP) decides, then ORIGINAL before DERIVED Image Type, then the most trusted
source, then Series Number, Instance Number and SOP Instance UID (deterministic).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from integration.errors import NoFrontalImageError

__all__ = ["FrontalSelection", "InstanceView", "classify_view", "select_frontal"]

_FRONTAL = ("PA", "AP")
_LATERAL_TERMS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "LLO", "RLO", "OBL"})

# CID 4010 DX View (SCT) plus legacy SNOMED-RT codes still sent by older modalities.
_VIEW_CODES: dict[tuple[str, str], str] = {
    ("SCT", "272479007"): "PA",
    ("SRT", "R-10214"): "PA",
    ("SNM3", "R-10214"): "PA",
    ("SCT", "399348003"): "AP",
    ("SRT", "R-10206"): "AP",
    ("SNM3", "R-10206"): "AP",
    ("SCT", "399067008"): "LATERAL",
    ("SCT", "399173006"): "LL",
    ("SCT", "399198007"): "RL",
    ("SCT", "260427002"): "OBLIQUE",
    ("SCT", "399059000"): "OBLIQUE",
    ("SCT", "399312000"): "OBLIQUE",
}

_TEXT_ATTRIBUTES = (
    "SeriesDescription",
    "AcquisitionDeviceProcessingDescription",
    "ProtocolName",
    "ImageComments",
)
_TEXT_LATERAL = re.compile(r"\b(LAT|LATERAL|LATERALE|LL|RL|LLD|RLD|DECUB\w*|OBL\w*|SEITLICH)\b")
_TEXT_PA = re.compile(r"\b(PA|P-A|POSTERO-?ANTERIOR|POSTEROANTERIOR)\b")
_TEXT_AP = re.compile(r"\b(AP|A-P|ANTERO-?POSTERIOR|ANTEROPOSTERIOR|PORTABLE|SUPINE)\b")
_TEXT_FRONTAL = re.compile(r"\b(FRONTAL|FRONTALE)\b")

_SOURCE_RANK = {"ViewPosition": 0, "ViewCodeSequence": 1, "description": 2}


@dataclass(frozen=True, slots=True)
class InstanceView:
    """The view of one instance as classified by :func:`classify_view`.

    Attributes
    ----------
    view
        ``"PA"``, ``"AP"``, ``"FRONTAL"`` (frontal, direction unknown), ``"LATERAL"``,
        ``"LL"``, ``"RL"``, ``"OBLIQUE"``, ... or ``None`` when nothing says.
    source
        ``"ViewPosition"``, ``"ViewCodeSequence"``, ``"description"`` or ``"none"``;
        ``"not-image"`` for an instance without an Image Pixel module.
    """

    view: str | None
    source: str

    @property
    def is_frontal(self) -> bool:
        """Whether the view is PA, AP or an unspecified frontal projection."""
        return self.view in ("PA", "AP", "FRONTAL")


@dataclass(frozen=True, slots=True)
class FrontalSelection:
    """The chosen frontal image.

    Attributes
    ----------
    dataset
        The selected dataset (the object passed in).
    index
        Its index in the input sequence.
    view
        ``"PA"``, ``"AP"`` or ``"FRONTAL"``.
    source
        Where the view came from (see :class:`InstanceView`).
    reason
        One line for the job record, e.g. ``"PA from ViewPosition; 3 instances: 1 PA, 2
        LATERAL"``. Holds UIDs and view terms only, no patient data.
    """

    dataset: Dataset
    index: int
    view: str
    source: str
    reason: str


def classify_view(ds: Dataset) -> InstanceView:
    """Classify the view of one instance (header is enough; no pixel data needed).

    Parameters
    ----------
    ds
        The instance's dataset (``stop_before_pixels`` headers are fine).

    Returns
    -------
    InstanceView
        The view and where it was found.
    """
    if "Rows" not in ds and "PixelData" not in ds:
        return InstanceView(view=None, source="not-image")

    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position:
        if position in _FRONTAL:
            return InstanceView(view=position, source="ViewPosition")
        if position in _LATERAL_TERMS:
            return InstanceView(view=_lateral_name(position), source="ViewPosition")
        # unknown term: fall through to the code and the text

    for item in ds.get("ViewCodeSequence") or []:
        key = (str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", "")))
        if key in _VIEW_CODES:
            return InstanceView(view=_VIEW_CODES[key], source="ViewCodeSequence")
        text_view = _view_from_text(str(item.get("CodeMeaning", "")))
        if text_view is not None:
            return InstanceView(view=text_view, source="ViewCodeSequence")

    for keyword in _TEXT_ATTRIBUTES:
        text_view = _view_from_text(str(ds.get(keyword, "") or ""))
        if text_view is not None:
            return InstanceView(view=text_view, source="description")

    if position:
        return InstanceView(view=position, source="ViewPosition")
    return InstanceView(view=None, source="none")


def select_frontal(
    datasets: Sequence[Dataset], *, order: Sequence[str] = ("PA", "AP")
) -> FrontalSelection:
    """Select the frontal image of a study.

    Parameters
    ----------
    datasets
        The study's instances (headers are enough).
    order
        Preferred frontal views, best first; ``"FRONTAL"`` (direction unknown) is always
        accepted after the listed ones. Must be a non-empty subset of PA, AP.

    Returns
    -------
    FrontalSelection
        The chosen dataset, its index, view, source and a reason line.

    Raises
    ------
    integration.errors.NoFrontalImageError
        When no instance is frontal; its ``reason`` counts what was found, e.g.
        ``"3 instances: 2 LATERAL, 1 without ViewPosition"``.
    """
    order = tuple(str(v).upper() for v in order)
    if not order or any(v not in _FRONTAL for v in order) or len(set(order)) != len(order):
        raise ValueError(f"order must be distinct values from {_FRONTAL}, got {order}")
    rank = {view: i for i, view in enumerate((*order, "FRONTAL"))}

    views = [classify_view(ds) for ds in datasets]
    summary = _summary(views)
    candidates = [
        i for i, v in enumerate(views) if v.view is not None and v.view in rank and v.is_frontal
    ]
    if not candidates:
        raise NoFrontalImageError(summary)

    def key(i: int) -> tuple[int, int, int, int, int, str]:
        ds, v = datasets[i], views[i]
        image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
        derived = 1 if image_type[:1] == ["DERIVED"] else 0
        return (
            rank[str(v.view)],
            derived,
            _SOURCE_RANK.get(v.source, 9),
            _int(ds.get("SeriesNumber")),
            _int(ds.get("InstanceNumber")),
            str(ds.get("SOPInstanceUID", "")),
        )

    best = min(candidates, key=key)
    chosen = views[best]
    return FrontalSelection(
        dataset=datasets[best],
        index=best,
        view=str(chosen.view),
        source=chosen.source,
        reason=f"{chosen.view} from {chosen.source}; {summary}",
    )


def _lateral_name(term: str) -> str:
    if term in ("LAT", "LATERAL"):
        return "LATERAL"
    if term in ("LLO", "RLO", "OBL"):
        return "OBLIQUE"
    return term


def _view_from_text(text: str) -> str | None:
    upper = text.upper()
    if not upper.strip():
        return None
    if _TEXT_LATERAL.search(upper):
        return "LATERAL"
    if _TEXT_PA.search(upper):
        return "PA"
    if _TEXT_AP.search(upper):
        return "AP"
    if _TEXT_FRONTAL.search(upper):
        return "FRONTAL"
    return None


def _summary(views: Sequence[InstanceView]) -> str:
    counts: Counter[str] = Counter()
    for v in views:
        if v.source == "not-image":
            counts["not an image"] += 1
        elif v.view is None:
            counts["without ViewPosition"] += 1
        else:
            counts[v.view] += 1
    n = len(views)
    parts = ", ".join(f"{c} {label}" for label, c in sorted(counts.items(), key=_count_order))
    noun = "instance" if n == 1 else "instances"
    return f"{n} {noun}: {parts}" if parts else f"{n} {noun}"


def _count_order(item: tuple[str, int]) -> tuple[int, str]:
    label, _ = item
    return ({"PA": 0, "AP": 1, "FRONTAL": 2}.get(label, 3), label)


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 2**31
