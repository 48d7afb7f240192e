"""Allocate: a target sparsity for every linear from the dense statistics of all layers:
the budget arithmetic (``budget``), the registered strategies (``strategies``: uniform, DAS, OWL,
ECoFLaP) and ECoFLaP's zeroth-order importance (``ecoflap``)."""
