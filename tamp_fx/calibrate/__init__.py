"""Calibrate: calibration data read into model inputs: text windows and LLaVA / ShareGPT4V
conversations (``samples``), videos, and the inputs of an exported program (``program``)."""
