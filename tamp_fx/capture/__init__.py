"""Capture: what the decoder layers see. One recorder of a decoder's inputs (``record``), the
activations it fills (``activations``), the graph of one layer (``graph``, torch.export) and the
layers the pipeline walks (``layers``; an exported program's in ``program``)."""
