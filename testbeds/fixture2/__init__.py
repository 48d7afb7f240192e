"""Fixture 2: a LLaVA-NeXT (anyres images, 88 image tokens) around SmolLM2-135M-Instruct.

:mod:`.scenes` draws the 128x128 scenes and six tasks, :mod:`.model` assembles the model from
SmolLM2's GGUF and the trained parts, :mod:`.train` trains them, :mod:`.data` writes
ShareGPT4V-style calibration conversations.
"""
