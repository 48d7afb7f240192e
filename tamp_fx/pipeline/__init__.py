"""Pipeline: the per-layer loop (``sequential``) and ``plan`` end to end (``plan``): open the
model, capture the decoder's inputs, profile, allocate, prune, assemble the plan."""
