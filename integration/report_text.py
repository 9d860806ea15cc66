"""How the draft report PDF writes text: embedded fonts, Paragraph markup, display forms.

The PDF (:mod:`integration.report_pdf`) embeds Bitstream Vera (``Vera.ttf``/``VeraBd.ttf``,
bundled with reportlab, Bitstream Vera licence) as a subset, so that its bytes do not depend
on the host's fonts. Vera covers Latin-1 plus a few more Latin letters, typographic quotes,
dashes and the euro sign, and no Greek, Cyrillic or CJK: :class:`PdfMarkup` prints a
character the font lacks as ``?`` and counts it (the PDF says so), instead of the empty box a
missing glyph would give; :func:`unrenderable_characters` lists them beforehand.
:func:`display_name`, :func:`display_date` and :func:`display_time` turn DICOM PN, DA and TM
values (PS3.5 6.2) into the forms printed in the header lines.
"""

from __future__ import annotations

import html
import os
import unicodedata
from functools import cache
from typing import Any

import reportlab
from pydicom.valuerep import PersonName
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

__all__ = [
    "FONT",
    "FONT_BOLD",
    "PdfMarkup",
    "display_date",
    "display_name",
    "display_time",
    "fit_line",
    "font_code_points",
    "unrenderable_characters",
]

FONT = "LLMCXR-Vera"
"""reportlab name of the embedded regular font (Vera)."""
FONT_BOLD = "LLMCXR-VeraBd"
"""reportlab name of the embedded bold font (Vera Bold)."""


@cache
def font_code_points() -> frozenset[int]:
    """Register the bundled Vera fonts once; return the code points both can draw."""
    folder = os.path.join(os.path.dirname(reportlab.__file__), "fonts")
    regular = TTFont(FONT, os.path.join(folder, "Vera.ttf"))
    bold = TTFont(FONT_BOLD, os.path.join(folder, "VeraBd.ttf"))
    pdfmetrics.registerFont(regular)
    pdfmetrics.registerFont(bold)
    return frozenset(regular.face.charToGlyph) & frozenset(bold.face.charToGlyph)


def unrenderable_characters(text: str) -> str:
    """The characters of ``text`` (after NFC) the embedded font cannot draw, in order, unique."""
    covered = font_code_points()
    seen: dict[str, None] = {}
    for char in unicodedata.normalize("NFC", text):
        if char not in "\n\r\t" and ord(char) not in covered:
            seen.setdefault(char, None)
    return "".join(seen)


class PdfMarkup:
    """Turns plain text into reportlab Paragraph markup, counting replaced characters.

    Call it with a text: NFC-normalised, ``<``/``>``/``&`` escaped, LF a line break, TAB a
    space, CR dropped, a character the fonts lack ``?`` (counted in :attr:`replaced`).
    """

    def __init__(self) -> None:
        self.replaced = 0
        self._covered = font_code_points()

    def __call__(self, text: str) -> str:
        out: list[str] = []
        for char in unicodedata.normalize("NFC", text):
            if char == "\n":
                out.append("<br/>")
            elif char in "\r":
                continue
            elif char == "\t":
                out.append(" ")
            elif ord(char) in self._covered:
                out.append(html.escape(char, quote=False))
            else:
                self.replaced += 1
                out.append("?")
        return "".join(out)


def fit_line(text: str, size: float, width: float) -> str:
    """``text`` in the regular font at ``size`` points, cut with "…" to fit ``width`` points.

    Characters the font lacks become ``?`` (one line, e.g. the footer).
    """
    clean = "".join(c if ord(c) in font_code_points() else "?" for c in text)
    while clean and pdfmetrics.stringWidth(clean, FONT, size) > width:
        clean = clean[:-2] + "…"
    return clean


# --- display forms of DICOM values --------------------------------------------------------


def display_name(value: Any) -> str:
    """A PN value as "Family, Given Middle" (prefix and suffix kept), or ``""``.

    Of a multi-group name (PS3.5 6.2.1) the first group with a family or given name.
    """
    if value is None or str(value).strip() == "":
        return ""
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    for group in (name, name.ideographic, name.phonetic):
        pn = group if isinstance(group, PersonName) else PersonName(str(group or ""))
        family = pn.family_name.strip()
        given = " ".join(p for p in (pn.given_name.strip(), pn.middle_name.strip()) if p)
        core = ", ".join(p for p in (family, given) if p)
        if core:
            return " ".join(p for p in (pn.name_prefix.strip(), core, pn.name_suffix.strip()) if p)
    return ""


def display_date(value: str) -> str:
    """A DA value ``YYYYMMDD`` as ``YYYY-MM-DD``; any other value as it is."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def display_time(value: str) -> str:
    """A TM value ``HHMM[SS[.F]]`` as ``HH:MM[:SS]``; any other value as it is."""
    digits = value.split(".")[0]
    if len(digits) >= 4 and digits.isdigit():
        parts = [digits[0:2], digits[2:4]] + ([digits[4:6]] if len(digits) >= 6 else [])
        return ":".join(parts)
    return value
