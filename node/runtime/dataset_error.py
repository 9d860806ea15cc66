"""Why a received data set is refused: the error that carries its C-STORE status.

The header reader (:mod:`node.runtime.header`), the bounded data set walk
(:mod:`node.runtime.dataset_walk`, :mod:`node.runtime.dataset_source`) and the ingest's UID
checks (:mod:`node.runtime.ingest`) raise :class:`DataSetError`; the ingest sink answers the
C-STORE request (PS3.7 9.1.1) with its status (PS3.4 B.2-1).
"""

from __future__ import annotations

from integration.status import StoreStatus

__all__ = ["DataSetError", "malformed"]


class DataSetError(ValueError):
    """The received data set cannot be used; carries its C-STORE status (PS3.4 B.2-1).

    Parameters
    ----------
    message
        The reason, sent back as the response's Error Comment (0000,0902) (PS3.7 Table
        E.1-1).
    status
        The C-STORE status to answer with.
    """

    def __init__(self, message: str, *, status: StoreStatus) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def malformed(message: str) -> DataSetError:
    """A :class:`DataSetError` with status 0xC210 "cannot understand" (PS3.4 B.2-1).

    Parameters
    ----------
    message
        What is wrong with the data set's encoding (PS3.5) or its Part 10 file (PS3.10).

    Returns
    -------
    DataSetError
        To be raised by the caller.
    """
    return DataSetError(message, status=StoreStatus.CANNOT_UNDERSTAND)
