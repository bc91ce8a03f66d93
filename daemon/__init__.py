"""pacs-ai: receives DICOM studies, runs the site's classifiers, returns Structured Reports."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacs-ai-daemon")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
