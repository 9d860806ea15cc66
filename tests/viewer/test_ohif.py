"""The node's draft outputs in a real viewer: OHIF (npm ``@ohif/app``) on a real Orthanc.

A real chest CR (RG1_UNCR, pydicom-data) and the node's AI DRAFT Comprehensive SR and
Encapsulated PDF for its study, built with the node's own builders, are sent to Orthanc over
C-STORE; OHIF's basic viewer then opens the study in headless Chromium, and the tests check
what a radiologist would see: the series names that begin with the warning, the PDF with its
banner, and the SR's text with its warning. A screenshot and the browser console of each test
are left in its ``tmp_path`` for debugging.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pypdf import PdfReader

from integration.draft_header import SERIES_WARNING, draft_series_description
from integration.encapsulated_pdf import (
    extract_pdf,
    pdf_series_description,
)
from integration.report_pdf import (
    BANNER_SUBTITLE,
    BANNER_TITLE,
    render_report_pdf,
)
from integration.sr import AI_DRAFT_NOTE, DEMO_NOTE
from integration.uids import (
    draft_instance_uid,
    draft_series_number,
    draft_series_uid,
)
from tests.dicom.orthanc import OrthancServer
from tests.helpers import node_draft_content, node_draft_pdf, node_draft_sr, rg1_file
from tests.viewer.conftest import OhifServer

pytestmark = [pytest.mark.viewer, pytest.mark.integration, pytest.mark.slow]

MODEL, VERSION = "LLM-CXR", "1.0.0-demo"
FINDINGS = "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax."
IMPRESSION = "No acute cardiopulmonary abnormality."
BOOT_MS = 180_000  # OHIF is slow to boot on two shared cores
THUMBNAILS = '[data-cy^="study-browser-thumbnail"]'
PDF_OBJECT = 'object[type="application/pdf"]'


def chest_study() -> Dataset:
    """RG1_UNCR (a real PA chest CR) as a new study."""
    ds = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = "PA chest"
    return ds


def draft_sr(image: Dataset) -> Dataset:
    """The node's draft Comprehensive SR (TID 2000) of the study, from the DEMO model."""
    return node_draft_sr(
        image,
        findings=FINDINGS,
        impression=IMPRESSION,
        model=MODEL,
        version=VERSION,
        software_version="llm-cxr-node 0.1.0",
        series_number=draft_series_number("sr", MODEL, VERSION),
    )


def draft_pdf(image: Dataset) -> Dataset:
    """The node's draft report PDF of the study as an Encapsulated PDF instance."""
    study = str(image.StudyInstanceUID)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    pdf = render_report_pdf(
        node_draft_content(
            image,
            findings=FINDINGS,
            impression=IMPRESSION,
            model=MODEL,
            version=VERSION,
            generated_at=created,
        )
    )
    return node_draft_pdf(
        pdf,
        image,
        model=MODEL,
        version=VERSION,
        sop_instance_uid=draft_instance_uid(
            "pdf",
            study,
            MODEL,
            VERSION,
            inputs=[str(image.SOPInstanceUID)],
            text=f"{FINDINGS}\x1f{IMPRESSION}",
        ),
        series_instance_uid=draft_series_uid("pdf", study, MODEL, VERSION),
        series_number=draft_series_number("pdf", MODEL, VERSION),
        created_at=created,
    )


def c_store(orthanc: OrthancServer, datasets: list[Dataset]) -> None:
    """Send the instances to Orthanc over DICOM C-STORE (pynetdicom SCU)."""
    ae = AE(ae_title="CXRNODE")
    for ds in datasets:
        ae.requested_contexts.append(
            build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        )
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established, orthanc.log_tail()
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status is not None and status.Status == 0x0000, status
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def study(viewer_orthanc: OrthancServer) -> dict[str, Dataset]:
    """The image, the draft SR and the draft PDF of one study, stored in Orthanc."""
    image = chest_study()
    sr, pdf = draft_sr(image), draft_pdf(image)
    c_store(viewer_orthanc, [image, sr, pdf])
    for ds in (image, sr, pdf):
        viewer_orthanc.wait_for_instance(str(ds.SOPInstanceUID), timeout=30)
    return {"image": image, "sr": sr, "pdf": pdf}


@pytest.fixture
def page(browser: Any, ohif: OhifServer, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser profile (no service worker) with a page; screenshot on the way out."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, service_workers="block")
    context.set_default_timeout(60_000)
    # a user who has taken OHIF's onboarding tour (its pop-up would cover the viewport)
    context.add_init_script(
        "try { localStorage.setItem('shownTours', '[\"basicViewerTour\"]') } catch (e) {}"
    )
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    page.on(
        "response",
        lambda r: console.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None,
    )
    page.on("requestfailed", lambda r: console.append(f"failed: {r.url} {r.failure}"))
    try:
        yield page
    finally:
        with contextlib.suppress(Exception):  # only for debugging; the page may be gone
            page.screenshot(path=str(tmp_path / "ohif.png"))
        (tmp_path / "console.log").write_text("\n".join(console))
        context.close()


# For each series in the study browser: its number, its lines as rendered (modality,
# description, "S:<number>", instance count), and whether the first characters of the
# description (its warning) lie inside the description's box, i.e. are not cut off by
# OHIF's text-overflow ellipsis.
_SERIES_JS = """
([sel, prefix]) => Array.from(document.querySelectorAll(sel)).map(thumb => {
  const lines = thumb.innerText.split('\\n').map(l => l.trim()).filter(l => l);
  let shown = null;
  const walker = document.createTreeWalker(thumb, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (lines.length < 2 || node.data.trim() !== lines[1]) continue;
    const range = document.createRange();
    range.setStart(node, 0);
    range.setEnd(node, Math.min(prefix.length, node.data.length));
    const text = range.getBoundingClientRect();
    const box = node.parentElement.getBoundingClientRect();
    shown = text.width > 0 && text.left >= box.left - 1 && text.right <= box.right + 1;
    break;
  }
  return {series: thumb.getAttribute('data-series'), lines, shown};
})
"""
# The bytes behind the PDF viewport's <object data=...> (a blob: URL), base64.
_FETCH_JS = """
async url => {
  const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}
"""


def open_study(page: Any, ohif: OhifServer, study: dict[str, Dataset]) -> dict[str, Any]:
    """Open OHIF's viewer on the study; wait for its three series in the study browser.

    Returns series number -> ``{"lines": [...], "shown": bool | None}``.
    """
    page.goto(ohif.viewer_url(str(study["image"].StudyInstanceUID)))
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel).length >= n",
        arg=[THUMBNAILS, 3],
        timeout=BOOT_MS,
    )
    return {
        str(item["series"]): item
        for item in page.evaluate(_SERIES_JS, [THUMBNAILS, SERIES_WARNING])
    }


def open_series(page: Any, ds: Dataset) -> None:
    """Double-click the series' entry in the study browser, as a user loads it."""
    page.locator(f'{THUMBNAILS}[data-series="{ds.SeriesNumber}"]').dblclick()


def red_fraction(png: bytes) -> float:
    """Share of the banner's dark red (#A00000) in a screenshot."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    red = (rgb[..., 0] > 120) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    return float(red.mean())


def test_study_browser_names_the_draft_series_with_the_warning(
    page: Any, ohif: OhifServer, study: dict[str, Dataset]
) -> None:
    series = open_study(page, ohif, study)
    image, sr, pdf = study["image"], study["sr"], study["pdf"]
    assert set(series) == {str(ds.SeriesNumber) for ds in (image, sr, pdf)}, series
    for ds, modality, description in (
        (sr, "SR", draft_series_description(demo=True)),
        (pdf, "DOC", pdf_series_description(demo=True)),
    ):
        item = series[str(ds.SeriesNumber)]
        assert item["lines"][0] == modality, item
        assert item["lines"][1] == description == ds.SeriesDescription, item
        assert item["lines"][1].startswith(SERIES_WARNING), item
        assert item["shown"] is True, f"the warning is cut off on screen: {item}"
    assert not series[str(image.SeriesNumber)]["lines"][1].startswith(SERIES_WARNING)


def test_pdf_viewport_shows_the_report_with_its_banner(
    page: Any, ohif: OhifServer, study: dict[str, Dataset], tmp_path: Path
) -> None:
    open_study(page, ohif, study)
    open_series(page, study["pdf"])
    viewport = page.locator(PDF_OBJECT)
    viewport.wait_for(state="visible", timeout=60_000)
    page.wait_for_function(
        "sel => (document.querySelector(sel)?.getAttribute('data') || '').length > 0",
        arg=PDF_OBJECT,
        timeout=60_000,
    )
    box = viewport.bounding_box()
    assert box is not None and box["width"] > 400 and box["height"] > 400, box

    # the document the viewport shows is the node's PDF, banner and all
    shown = base64.b64decode(page.evaluate(_FETCH_JS, viewport.get_attribute("data")))
    sent = extract_pdf(study["pdf"])
    assert shown[: len(sent)] == sent and len(shown) - len(sent) in (0, 1)
    text = " ".join((p.extract_text() or "") for p in PdfReader(io.BytesIO(shown)).pages)
    text = " ".join(text.split())
    assert BANNER_TITLE in text  # "AI-generated DRAFT, not verified by a radiologist"
    assert BANNER_SUBTITLE in text

    # and Chromium's PDF viewer has drawn it: the banner's red is on screen
    deadline = time.monotonic() + 60
    fraction = 0.0
    while time.monotonic() < deadline:
        fraction = red_fraction(viewport.screenshot())
        if fraction > 0.01:
            break
        page.wait_for_timeout(500)
    (tmp_path / "pdf-viewport.png").write_bytes(viewport.screenshot())
    assert fraction > 0.01, f"no red banner in the PDF viewport ({fraction:.4f})"


def test_sr_viewport_shows_the_draft_text_and_the_warning(
    page: Any, ohif: OhifServer, study: dict[str, Dataset]
) -> None:
    open_study(page, ohif, study)
    open_series(page, study["sr"])
    grid = page.locator('[data-cy="viewport-grid"]')
    page.wait_for_function(
        "([sel, want]) => (document.querySelector(sel)?.innerText || '').includes(want)",
        arg=['[data-cy="viewport-grid"]', IMPRESSION],
        timeout=60_000,
    )
    text = " ".join(grid.inner_text().split())
    note = AI_DRAFT_NOTE.format(algorithm=MODEL, version=VERSION)
    assert note in text  # "AI-generated DRAFT report ... NOT VERIFIED by a radiologist ..."
    assert DEMO_NOTE in text
    assert FINDINGS in text and IMPRESSION in text
