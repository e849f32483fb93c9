"""Datasets: geo-tagged image sets, file-name parsing, image loading and the synthetic city."""
