"""CNN/LSTM classifiers for DICOM series: manifests, registry, preprocessing, inference, training.

This package stands alone: it never imports the daemon, so a site can train and test models
without running the service.
"""
