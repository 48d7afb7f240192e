"""Prune: scores and keep-masks of one linear (``masks``, ``scores``: magnitude, Wanda,
SparseGPT in ``sparsegpt``) and 2:4 semi-structured weights (``semi_structured``)."""
