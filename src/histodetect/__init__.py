"""histodetect: find metastatic cancer in lymph-node histopathology patches."""

__version__ = "0.1.0"
