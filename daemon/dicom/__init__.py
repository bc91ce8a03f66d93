"""DICOM vocabulary and plumbing shared by every stage, below all of them.

- `status`: DIMSE statuses and association-reject codes by name, with their meanings.
- `commitment`: Storage Commitment requests and reports, read and written as values.
- `network`: association timeouts, TLS contexts, starting a pynetdicom server.
- `transport`: the prompt, bounded acceptor transport every server here uses.
"""
