"""Methods that are one Segmenter class rather than a staged Pipeline (e.g. PerSAM / PerSAM-F)."""
