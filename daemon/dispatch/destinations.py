"""One place that knows the destination kinds: DIMSE (C-STORE) or DICOMweb (STOW-RS).

The dispatch job, `pacs-ai echo`, `status` and the start-up check ask here, and get the
same values (`SendOutcome`, `EchoOutcome`) whichever way a destination is reached.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import Destination, DicomWebDestination
from daemon.dicom.network import AssociationOptions
from daemon.dispatch import dicomweb, scu
from daemon.dispatch.scu import EchoOutcome, SendOutcome

AnyDestination = Destination | DicomWebDestination


def address(destination: AnyDestination) -> str:
    """`AE@host:port` or the DICOMweb root, for lines and `status`."""
    if isinstance(destination, DicomWebDestination):
        return dicomweb.address(destination)
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def send(
    destination: AnyDestination,
    path: Path,
    fallback_path: Path | None,
    calling_ae: str,
    options: AssociationOptions | None = None,
) -> SendOutcome:
    """Deliver one report file (with its fallback) the destination's way."""
    if isinstance(destination, DicomWebDestination):
        return dicomweb.send_file(path, fallback_path, destination, options)
    return scu.send_file(path, fallback_path, destination, calling_ae, options)


def echo(
    destination: AnyDestination, calling_ae: str, options: AssociationOptions | None = None
) -> EchoOutcome:
    """C-ECHO, or a one-study QIDO-RS for a DICOMweb archive."""
    if isinstance(destination, DicomWebDestination):
        return dicomweb.echo(destination, options)
    return scu.echo(destination, calling_ae, options)
