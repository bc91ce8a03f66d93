"""The DICOM receiver: C-ECHO and C-STORE into the spool, acknowledged after commit."""

from daemon.receive.scp import Receiver, configure_pynetdicom, warn_if_open

__all__ = ["Receiver", "configure_pynetdicom", "warn_if_open"]
