"""Write: every output made from a plan or a model: pruned weights in every source format
(``apply``), quantized (``quantize``, ``int8_weight``), a decoder exported as a program
(``export``), a GGUF converted."""
