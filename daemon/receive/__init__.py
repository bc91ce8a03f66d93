"""The DICOM receiver: C-ECHO and C-STORE into the spool, acknowledged after commit; and the
services a modality asks of it: MPPS (daemon.receive.mpps) and Storage Commitment as SCP
(daemon.receive.commitment_scp). Reports a PACS sends about our SRs: daemon.receive.commitment."""

from daemon.receive.scp import Receiver, configure_pynetdicom, warn_if_open

__all__ = ["Receiver", "configure_pynetdicom", "warn_if_open"]
