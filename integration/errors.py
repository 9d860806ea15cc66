"""Exceptions raised at the PACS boundary (pixel conversion, selection, SR, delivery).

Every error carries the DICOM status (PS3.7 Annex C; PS3.4 GG.4 for Storage) and/or the
HTTP status (PS3.18 10.5.3 for STOW-RS) it corresponds to, so that one place in the node
can map it to a job state, a DIMSE response or an API response.  Delivery errors also carry
a ``transient`` flag the node's retry logic uses: ``True`` means "try again later" (network
down, association refused transiently, peer out of resources), ``False`` means retrying the
same object against the same peer will fail the same way (the peer rejected the data set).

The names mirror the DICOM status categories used by :mod:`integration.status` (owned by
the ingest side); this module does not import it so that both can be read alone.
"""

from __future__ import annotations

__all__ = [
    "AssociationAbortedError",
    "AssociationRejectedError",
    "ConnectionFailedError",
    "DeliveryError",
    "DeliveryTimeoutError",
    "EncapsulatedPdfError",
    "FhirBuildError",
    "FhirDeliveryError",
    "Hl7AckError",
    "Hl7BuildError",
    "IntegrationError",
    "KosBuildError",
    "MllpError",
    "MultiFrameError",
    "NoFrontalImageError",
    "OutputBuildError",
    "PixelDataError",
    "PresentationContextError",
    "ReportRenderError",
    "SRBuildError",
    "StoreFailedError",
    "StowError",
    "UnsupportedPhotometricError",
]

# DICOM Storage failure status "Cannot understand" (PS3.4 Table GG.4-1, 0xC000-0xCFFF).
STATUS_CANNOT_UNDERSTAND = 0xC000
# HTTP 422: the request was well formed but its content cannot be processed.
HTTP_UNPROCESSABLE = 422


class IntegrationError(Exception):
    """Base class of all errors raised by :mod:`integration`.

    Parameters
    ----------
    message
        Human-readable description naming the DICOM concept involved. Never contains
        patient-identifying data.
    dicom_status
        DICOM status code (PS3.7 Annex C) this error corresponds to, if any.
    http_status
        HTTP status code this error corresponds to, if any.
    transient
        Whether retrying the same operation later may succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        dicom_status: int | None = None,
        http_status: int | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.dicom_status = dicom_status
        self.http_status = http_status
        self.transient = transient

    def __str__(self) -> str:
        parts = [self.message]
        if self.dicom_status is not None:
            parts.append(f"DICOM status 0x{self.dicom_status:04X}")
        if self.http_status is not None:
            parts.append(f"HTTP {self.http_status}")
        return " | ".join(parts)


# --- pixel data (PS3.3 C.7.6.3 Image Pixel module) ------------------------------------------


class PixelDataError(IntegrationError):
    """The image's pixel data cannot be turned into an 8-bit grey image.

    Parameters
    ----------
    message
        What is wrong.
    attribute
        The DICOM attribute at fault, e.g. ``"Pixel Data (7FE0,0010)"``.
    """

    def __init__(self, message: str, *, attribute: str) -> None:
        super().__init__(
            f"{attribute}: {message}",
            dicom_status=STATUS_CANNOT_UNDERSTAND,
            http_status=HTTP_UNPROCESSABLE,
            transient=False,
        )
        self.attribute = attribute


class UnsupportedPhotometricError(PixelDataError):
    """Photometric Interpretation (0028,0004) is not one the converter handles."""


class MultiFrameError(PixelDataError):
    """Number of Frames (0028,0008) > 1 and no frame was chosen."""


# --- frontal image selection --------------------------------------------------------------


class NoFrontalImageError(IntegrationError):
    """No instance of the study is a frontal (PA/AP) chest image.

    Parameters
    ----------
    reason
        Why, e.g. ``"3 instances: 2 LATERAL, 1 without View Position"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"no frontal (PA/AP) image: {reason}", http_status=HTTP_UNPROCESSABLE)
        self.reason = reason


# --- Structured Report ----------------------------------------------------------------------


class SRBuildError(IntegrationError):
    """The draft Structured Report cannot be built from the given inputs."""

    def __init__(self, message: str) -> None:
        super().__init__(message, http_status=HTTP_UNPROCESSABLE)


# --- delivery (C-STORE SCU, STOW-RS) --------------------------------------------------------


class DeliveryError(IntegrationError):
    """Sending an object to a destination failed.

    Parameters
    ----------
    message
        What failed; names the destination by AE title / address / URL only.
    dicom_status, http_status, transient
        See :class:`IntegrationError`.
    """


class ConnectionFailedError(DeliveryError):
    """TCP connection (or TLS handshake) to the destination failed. Transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class AssociationRejectedError(DeliveryError):
    """The peer sent A-ASSOCIATE-RJ (PS3.8 9.3.4).

    Parameters
    ----------
    result
        1 = rejected-permanent, 2 = rejected-transient.
    source
        1 = service-user, 2 = service-provider (ACSE), 3 = service-provider (presentation).
    reason
        Reason/diagnostic code (e.g. 3 = calling AE title not recognised).
    """

    def __init__(self, message: str, *, result: int, source: int, reason: int) -> None:
        super().__init__(message, transient=result != 1)
        self.result = result
        self.source = source
        self.reason = reason


class AssociationAbortedError(DeliveryError):
    """The association was aborted (A-ABORT / A-P-ABORT) before a response came. Transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class DeliveryTimeoutError(DeliveryError):
    """ACSE, DIMSE or network timeout while talking to the destination. Transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class PresentationContextError(DeliveryError):
    """The peer accepted no presentation context for the object's SOP Class. Permanent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class StoreFailedError(DeliveryError):
    """The peer answered the C-STORE with a failure status (PS3.4 Table B.2-1).

    0xA7xx (Refused: out of resources) and 0x0213 (resource limitation) are transient; every
    other failure (0xA9xx data set does not match SOP Class, 0xCxxx cannot understand,
    0x0122 SOP Class not supported, 0x0124 not authorised, ...) is treated as permanent.
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, dicom_status=status, transient=is_transient_status(status))


class StowError(DeliveryError):
    """STOW-RS request failed (PS3.18 10.5). 5xx, 408 and 429 are transient."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        dicom_status: int | None = None,
        transient: bool | None = None,
    ) -> None:
        if transient is None:
            transient = http_status is None or http_status >= 500 or http_status in (408, 429)
        super().__init__(
            message, http_status=http_status, dicom_status=dicom_status, transient=transient
        )


def is_transient_status(status: int) -> bool:
    """Whether a C-STORE failure status may succeed on retry.

    Parameters
    ----------
    status
        DIMSE status (PS3.7 Annex C, PS3.4 Table B.2-1).

    Returns
    -------
    bool
        ``True`` for "Refused: Out of Resources" (0xA700-0xA7FF) and "Resource limitation"
        (0x0213); ``False`` otherwise.
    """
    return (status & 0xFF00) == 0xA700 or status == 0x0213


# --- report outputs (PDF, Encapsulated PDF, KOS, HL7 v2, FHIR) and their transports --------


class OutputBuildError(IntegrationError):
    """A report output (PDF, DICOM object, HL7 message, FHIR resource) cannot be built (422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, http_status=HTTP_UNPROCESSABLE)


class ReportRenderError(OutputBuildError):
    """The draft report PDF cannot be rendered (:mod:`integration.report_pdf`)."""


class EncapsulatedPdfError(OutputBuildError):
    """The Encapsulated PDF instance (PS3.3 A.45) cannot be built or read back."""


class KosBuildError(OutputBuildError):
    """The IOCM rejection note (Key Object Selection Document) cannot be built."""


class Hl7BuildError(OutputBuildError):
    """The HL7 v2.5.1 ORU^R01 cannot be built or does not validate against its structure."""


class FhirBuildError(OutputBuildError):
    """The FHIR resources do not validate (structure, value sets, reference types)."""


class MllpError(DeliveryError):
    """The MLLP exchange broke its framing (HL7 v2 MLLP release 1).

    No start block, the connection closed before the end block, or the reply exceeded the
    size limit. Transient by default: the peer answered, but not with a usable ACK.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message, transient=transient)


class Hl7AckError(DeliveryError):
    """The receiver did not accept the HL7 message (MSA-1 not AA/CA) or the ACK is unusable.

    Parameters
    ----------
    message
        What happened: acknowledgment code, control ID and ERR-3 codes (HL7 table 0357);
        never message content or receiver text.
    ack_code
        MSA-1 (HL7 table 0008: AE, AR, CE, CR), or ``None`` for a malformed/missing ACK.
    error_codes
        ERR-3 identifiers (HL7 table 0357, e.g. ``"207"``) found in the ACK.
    transient
        Whether sending the same message again later may succeed.
    detail
        MSA-3 / ERR-8 free text of the receiver. It may quote the message (patient data),
        so it is kept here and never put into the message or a log line.
    """

    def __init__(
        self,
        message: str,
        *,
        ack_code: str | None,
        error_codes: tuple[str, ...] = (),
        transient: bool,
        detail: str = "",
    ) -> None:
        super().__init__(message, transient=transient)
        self.ack_code = ack_code
        self.error_codes = error_codes
        self.detail = detail


class FhirDeliveryError(DeliveryError):
    """A FHIR REST interaction failed. 5xx, 408, 429, timeouts and connection errors are
    transient; other 4xx (400, 401, 403, 404, 409, 412, 422, ...) are permanent."""

    def __init__(
        self, message: str, *, http_status: int | None = None, transient: bool | None = None
    ) -> None:
        if transient is None:
            transient = http_status is None or http_status >= 500 or http_status in (408, 429)
        super().__init__(message, http_status=http_status, transient=transient)
