"""The AI draft report as a PDF (reportlab): what a viewer without SR support can show.

Layout (A4 portrait, text flows over as many pages as needed):

```
+------------------------------------------------------------------+
| AI-generated DRAFT, not verified by a radiologist     (banner,   |
| Preliminary, for review only. Not for diagnosis.   every page)   |
+------------------------------------------------------------------+
| Patient name / ID / birth date / sex             | [thumbnail of |
| Accession / study date and time / description    |  the image    |
| Model: name version                               |  read, opt.] |
| [DEMO MODEL box]                                                 |
| Findings                                                         |
|   ...                                                            |
| Impression                                                       |
|   ...                                                            |
| generated <time> by <software> <version>          Page n of m   |
+------------------------------------------------------------------+
```

Choices, documented here because they are part of the contract:

- **Long text flows** onto further pages, each with the banner and "Page n of m", so the
  warning is never off-screen. Each section is capped at :data:`MAX_SECTION_CHARS`
  characters and :data:`MAX_SECTION_LINES` lines (six pages or so each); beyond that the
  text is cut and an explicit note says how many characters are not shown and that the
  DICOM SR carries the full text.
- **Deterministic bytes**, because the node derives UIDs from content: reportlab's
  ``invariant`` mode, the PDF CreationDate/ModDate taken from
  :attr:`DraftReportContent.generated_at` (not the clock), and the document /ID digest
  seeded from it too (reportlab seeds it with ``SOURCE_DATE_EPOCH`` when that is set, even
  in invariant mode). The same inputs give the same bytes in any process, time zone or
  environment with the same reportlab and Pillow versions.
- **Fonts**: Bitstream Vera (``Vera.ttf``/``VeraBd.ttf``, bundled with reportlab, Bitstream
  Vera licence) is embedded as a subset. It covers Latin-1 (e.g. ``Müller^Jürgen``) plus a
  few more Latin letters, typographic quotes, dashes and the euro sign; it has no Greek,
  Cyrillic or CJK glyphs. Characters the font lacks are printed as ``?`` and the page says
  so ("n characters cannot be shown ... the DICOM SR carries the exact text"), instead of
  the empty boxes a missing glyph would otherwise give. A system font such as DejaVu is not
  used: it is not on every host, and the bytes must not depend on the host. Fonts and text
  markup are :mod:`integration.report_text`'s.
- No patient data goes into the PDF metadata (title, subject, author, keywords).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from pydicom.dataset import Dataset
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    BaseDocTemplate,
    Flowable,
    Frame,
    Image,
    KeepTogether,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)

from integration.errors import ReportRenderError
from integration.header_values import header_text
from integration.report_text import (
    FONT,
    FONT_BOLD,
    PdfMarkup,
    display_date,
    display_name,
    display_time,
    fit_line,
)

__all__ = [
    "BANNER_SUBTITLE",
    "BANNER_TITLE",
    "DEMO_PDF_NOTE",
    "MAX_SECTION_CHARS",
    "MAX_SECTION_LINES",
    "THUMBNAIL_LABEL",
    "DraftReportContent",
    "ReportHeader",
    "render_report_pdf",
    "report_header_from",
]

BANNER_TITLE = "AI-generated DRAFT, not verified by a radiologist"
BANNER_SUBTITLE = "Preliminary, for review only. Not for diagnosis."
DEMO_PDF_NOTE = (
    "DEMO MODEL: randomly initialised weights. This text is meaningless and must not be "
    "used for any clinical purpose."
)
MAX_SECTION_CHARS = 20_000
"""Characters of one section (findings, impression) printed before the text is cut."""
MAX_SECTION_LINES = 200
"""Lines of one section printed before the text is cut (bounds the page count)."""
THUMBNAIL_LABEL = "Image read by the model (downscaled copy, not for diagnosis)"

_BANNER_RED = colors.HexColor("#A00000")  # white on it: WCAG contrast ratio about 8.4:1
_PAGE_W, _PAGE_H = A4
_MARGIN = 15 * mm
_BANNER_H = 20 * mm
_FOOTER_H = 10 * mm
_THUMB_MAX_PX = 512  # longest side of the embedded thumbnail
_THUMB_BOX = 55 * mm


@dataclass(frozen=True, slots=True)
class ReportHeader:
    """Patient and study lines printed on the report (all strings, empty when unknown).

    Attributes
    ----------
    patient_name
        Display form, e.g. ``"Müller, Jürgen"`` (see :func:`report_header_from`).
    patient_id, birth_date, sex, accession_number, study_date, study_time, study_description
        Display strings; dates as ``YYYY-MM-DD``, times as ``HH:MM[:SS]`` (+ UTC offset).
    """

    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""


@dataclass(frozen=True, slots=True)
class DraftReportContent:
    """Everything printed on the draft report PDF.

    Attributes
    ----------
    header
        Patient and study lines.
    impression
        Impression text (must not be empty).
    findings
        Findings text; ``None`` or empty prints "(none)".
    model_name, model_version
        The model that wrote the draft.
    demo
        Whether the model is the DEMO bundle (random weights): adds :data:`DEMO_PDF_NOTE`.
    generated_at
        When the draft was generated (timezone-aware); printed in the footer and used as the
        PDF CreationDate/ModDate, so the same inputs give the same bytes.
    software_name, software_version
        The node software that rendered the PDF (footer, PDF Creator).
    thumbnail
        The image the model read (2-D ``uint8`` array or PIL image), printed downscaled
        and labelled; ``None`` for no image. Not compared by ``==``.
    """

    header: ReportHeader
    impression: str
    findings: str | None
    model_name: str
    model_version: str
    demo: bool
    generated_at: dt.datetime
    software_name: str = "llm-cxr-node"
    software_version: str = ""
    thumbnail: npt.NDArray[np.uint8] | PILImage.Image | None = field(default=None, compare=False)


# --- header from DICOM ----------------------------------------------------------------------


def report_header_from(ds: Dataset) -> ReportHeader:
    """Patient and study lines from an image's header (PS3.3 C.7.1.1 Patient, C.7.2.1 Study).

    Parameters
    ----------
    ds
        The image the model read (header is enough). Missing or empty attributes give empty
        strings (never ``"None"``).

    Returns
    -------
    ReportHeader
        Patient Name (0010,0010) as "Family, Given Middle" (prefix/suffix kept; of a
        multi-group name the first non-empty group), Patient ID (0010,0020), Patient's Birth
        Date (0010,0030) and Study Date (0008,0020) as ``YYYY-MM-DD``, Patient's Sex
        (0010,0040) spelled out, Accession Number (0008,0050), Study Time (0008,0030) as
        ``HH:MM[:SS]`` plus Timezone Offset From UTC (0008,0201) when present, Study
        Description (0008,1030).
    """
    study_time = display_time(header_text(ds, "StudyTime"))
    offset = header_text(ds, "TimezoneOffsetFromUTC")
    if study_time and offset:
        study_time = f"{study_time} (UTC{offset})"
    return ReportHeader(
        patient_name=display_name(ds.get("PatientName")),
        patient_id=header_text(ds, "PatientID"),
        birth_date=display_date(header_text(ds, "PatientBirthDate")),
        sex={"M": "male", "F": "female", "O": "other"}.get(
            header_text(ds, "PatientSex").upper(), ""
        ),
        accession_number=header_text(ds, "AccessionNumber"),
        study_date=display_date(header_text(ds, "StudyDate")),
        study_time=study_time,
        study_description=header_text(ds, "StudyDescription"),
    )


# --- rendering ------------------------------------------------------------------------------


def render_report_pdf(content: DraftReportContent) -> bytes:
    """Render the AI draft report PDF.

    Parameters
    ----------
    content
        What to print; see :class:`DraftReportContent`.

    Returns
    -------
    bytes
        A PDF (1.4, A4), byte-identical for identical ``content``.

    Raises
    ------
    integration.errors.ReportRenderError
        Empty impression, naive ``generated_at``, a thumbnail that is not a 2-D ``uint8``
        array or PIL image, or reportlab failing.
    """
    if not content.impression or not content.impression.strip():
        raise ReportRenderError("impression text is empty")
    if content.generated_at.tzinfo is None or content.generated_at.utcoffset() is None:
        raise ReportRenderError("generated_at must be timezone-aware")
    for label, value in (("model_name", content.model_name), ("version", content.model_version)):
        if not value.strip():
            raise ReportRenderError(f"{label} must not be empty")
    thumbnail = _thumbnail(content.thumbnail) if content.thumbnail is not None else None

    text = PdfMarkup()
    story = _story(content, text, thumbnail)
    if text.replaced:
        story.insert(
            1,
            Paragraph(
                f"Note: {text.replaced} character(s) cannot be shown with this PDF's font and "
                "are printed as '?'; the DICOM SR carries the exact text.",
                _style("note"),
            ),
        )

    buffer = BytesIO()
    generated = content.generated_at.astimezone(dt.UTC)
    pdf_date = generated.strftime("D:%Y%m%d%H%M%S+00'00'")
    doc = _document(buffer, content)
    try:
        doc.build(story, canvasmaker=_numbered_canvas(_footer(content, generated), pdf_date))
    except Exception as exc:  # reportlab raises LayoutError, ValueError, ...
        # its messages quote the flowable's text (patient data): the type only, not chained
        raise ReportRenderError(
            f"reportlab could not lay out the report ({type(exc).__name__})"
        ) from None
    return buffer.getvalue()


def _footer(content: DraftReportContent, generated: dt.datetime) -> str:
    """The footer line: generation time (UTC), software and model (DEMO marked)."""
    return (
        f"Generated {generated.strftime('%Y-%m-%d %H:%M:%S')} UTC by "
        f"{content.software_name} {content.software_version}".rstrip()
        + f" | model {content.model_name} {content.model_version}"
        + (" (DEMO)" if content.demo else "")
    )


def _document(buffer: BytesIO, content: DraftReportContent) -> BaseDocTemplate:
    """The A4 document: margins around banner and footer, one body frame, no patient data
    in the metadata (title, author, subject, creator, keywords), invariant output."""
    doc = BaseDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=_MARGIN + _BANNER_H + 4 * mm,
        bottomMargin=_MARGIN + _FOOTER_H,
        title="AI-generated DRAFT radiology report (not verified)",
        author=content.software_name,
        subject="Preliminary AI draft report; not verified by a radiologist",
        creator=f"{content.software_name} {content.software_version}".strip(),
        keywords="AI draft, unverified",
        invariant=1,
        lang="en",
    )
    frame = Frame(
        doc.leftMargin,
        doc.bottomMargin,
        doc.width,
        doc.height,
        id="body",
        leftPadding=0,
        rightPadding=0,
        topPadding=0,
        bottomPadding=0,
    )
    doc.addPageTemplates([PageTemplate(id="page", frames=[frame], onPage=_draw_banner)])
    return doc


def _style(kind: str) -> ParagraphStyle:
    base = {"fontName": FONT, "fontSize": 10, "leading": 13, "splitLongWords": 1}
    styles: dict[str, dict[str, Any]] = {
        "body": {"spaceAfter": 4},
        "label": {"fontName": FONT_BOLD, "fontSize": 9, "leading": 12},
        "value": {"fontSize": 9, "leading": 12},
        "heading": {"fontName": FONT_BOLD, "fontSize": 12, "leading": 16, "spaceBefore": 8},
        "note": {"fontSize": 8, "leading": 10, "textColor": colors.HexColor("#333333")},
        "demo": {"fontName": FONT_BOLD, "fontSize": 10, "leading": 13, "textColor": _BANNER_RED},
        "caption": {"fontSize": 7, "leading": 9, "alignment": 1},
    }
    return ParagraphStyle(name=kind, **{**base, **styles[kind]})


def _story(
    content: DraftReportContent, text: PdfMarkup, thumbnail: PILImage.Image | None
) -> list[Flowable]:
    """The flowables: header (details, thumbnail), DEMO box, Findings, Impression, end note."""
    header: Flowable = _details(content, text)
    if thumbnail is not None:
        header = _beside_thumbnail(header, thumbnail)
    story: list[Flowable] = [header, Spacer(1, 3 * mm)]
    if content.demo:
        demo = Table([[Paragraph(DEMO_PDF_NOTE, _style("demo"))]], colWidths=["100%"])
        demo.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 1.5, _BANNER_RED)]))
        story += [demo, Spacer(1, 2 * mm)]
    for title, body in (("Findings", content.findings), ("Impression", content.impression)):
        paragraphs = _section_paragraphs(body, text)
        story.append(KeepTogether([Paragraph(title, _style("heading")), paragraphs[0]]))
        story.extend(paragraphs[1:])
    story.append(Spacer(1, 4 * mm))
    story.append(Paragraph("End of AI draft report.", _style("note")))
    return story


def _details(content: DraftReportContent, text: PdfMarkup) -> Table:
    """The label/value table of patient, study and model lines."""
    h = content.header
    rows = [
        ("Patient", h.patient_name),
        ("Patient ID", h.patient_id),
        ("Birth date", h.birth_date),
        ("Sex", h.sex),
        ("Accession", h.accession_number),
        ("Study date", " ".join(p for p in (h.study_date, h.study_time) if p)),
        ("Study", h.study_description),
        ("Model", f"{content.model_name} {content.model_version}"),
    ]
    table_rows = [
        [Paragraph(label, _style("label")), Paragraph(text(value), _style("value"))]
        for label, value in rows
    ]
    details = Table(table_rows, colWidths=[28 * mm, None], hAlign="LEFT")
    details.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                ("TOPPADDING", (0, 0), (-1, -1), 1),
            ]
        )
    )
    return details


def _beside_thumbnail(details: Flowable, thumbnail: PILImage.Image) -> Table:
    """``details`` on the left, the labelled thumbnail (JPEG) in a box on the right."""
    w, hgt = thumbnail.size
    scale = min(_THUMB_BOX / w, _THUMB_BOX / hgt)
    jpeg = BytesIO()  # DCT: about 50 kB for a 512-pixel chest image, Flate about 260 kB
    thumbnail.save(jpeg, format="JPEG", quality=85)
    jpeg.seek(0)
    image = Image(jpeg, width=w * scale, height=hgt * scale)
    caption = Paragraph(THUMBNAIL_LABEL, _style("caption"))
    side = Table([[image], [caption]], colWidths=[_THUMB_BOX + 2 * mm])
    side.setStyle(TableStyle([("ALIGN", (0, 0), (-1, -1), "CENTER")]))
    header = Table(
        [[details, side]],
        colWidths=[_PAGE_W - 2 * _MARGIN - _THUMB_BOX - 6 * mm, _THUMB_BOX + 6 * mm],
    )
    header.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
            ]
        )
    )
    return header


def _section_paragraphs(body: str | None, text: PdfMarkup) -> list[Flowable]:
    clean = (body or "").strip()
    if not clean:
        return [Paragraph("(none)", _style("body"))]
    clean = clean.replace("\r\n", "\n")
    kept = "\n".join(clean.split("\n")[:MAX_SECTION_LINES])[:MAX_SECTION_CHARS]
    omitted = len(clean) - len(kept)
    blocks = [b.strip() for b in kept.split("\n\n") if b.strip()]
    out: list[Flowable] = [Paragraph(text(b), _style("body")) for b in blocks]
    if omitted:
        out.append(
            Paragraph(
                f"[Text cut here: {omitted} further characters are not shown in this PDF; "
                "the DICOM SR carries the full text.]",
                _style("note"),
            )
        )
    return out


def _thumbnail(image: npt.NDArray[np.uint8] | PILImage.Image) -> PILImage.Image:
    if isinstance(image, PILImage.Image):
        pil = image.convert("L")
    elif isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype == np.uint8:
        pil = PILImage.fromarray(np.ascontiguousarray(image), mode="L")
    else:
        raise ReportRenderError("thumbnail must be a 2-D uint8 array or a PIL image")
    if min(pil.size) < 1:
        raise ReportRenderError("thumbnail is empty")
    pil = pil.copy()
    pil.thumbnail((_THUMB_MAX_PX, _THUMB_MAX_PX), PILImage.Resampling.LANCZOS)
    return pil


def _draw_banner(canvas: Canvas, doc: BaseDocTemplate) -> None:
    canvas.saveState()
    top = _PAGE_H - _MARGIN
    canvas.setFillColor(_BANNER_RED)
    canvas.rect(_MARGIN, top - _BANNER_H, _PAGE_W - 2 * _MARGIN, _BANNER_H, stroke=0, fill=1)
    canvas.setFillColor(colors.white)
    canvas.setFont(FONT_BOLD, 15)
    canvas.drawCentredString(_PAGE_W / 2, top - 9 * mm, BANNER_TITLE)
    canvas.setFont(FONT, 10)
    canvas.drawCentredString(_PAGE_W / 2, top - 15.5 * mm, BANNER_SUBTITLE)
    canvas.restoreState()


def _numbered_canvas(footer: str, pdf_date: str) -> Callable[..., Canvas]:
    """A canvas class that writes the footer with "Page n of m" once all pages are known."""

    class _NumberedCanvas(Canvas):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []
            # CreationDate/ModDate from the inputs, whatever the clock or SOURCE_DATE_EPOCH
            self.setDateFormatter(lambda *_: pdf_date)
            # reportlab seeds the document /ID digest with its timestamp (SOURCE_DATE_EPOCH
            # when set, even in invariant mode): seed it from the inputs instead
            signature = hashlib.md5(usedforsecurity=False)
            signature.update(b"a reportlab document" + pdf_date.encode("ascii"))
            self._doc.signature = signature

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for number, state in enumerate(self._pages, start=1):
                self.__dict__.update(state)
                self.setFont(FONT, 7.5)
                self.setFillColor(colors.HexColor("#333333"))
                self.drawString(
                    _MARGIN, _MARGIN, fit_line(footer, 7.5, _PAGE_W - 2 * _MARGIN - 25 * mm)
                )
                self.setFont(FONT_BOLD, 8)
                self.drawRightString(_PAGE_W - _MARGIN, _MARGIN, f"Page {number} of {total}")
                super().showPage()
            super().save()

    return _NumberedCanvas
