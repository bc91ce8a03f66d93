"""The HTTP face of `serve`: DICOMweb STOW-RS, /metrics and health on one uvicorn server."""

from daemon.http.server import HttpStartError
from daemon.http.service import HttpService

__all__ = ["HttpService", "HttpStartError"]
