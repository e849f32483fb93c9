"""vpr: visual place recognition — find where a photo was taken by retrieving geo-tagged images."""

__version__ = "0.1.0"
