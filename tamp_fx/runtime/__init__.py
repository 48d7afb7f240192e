"""Runtime: where and how a run happens, never what it decides. Process groups (``distributed``;
the variables torchrun sets, ``launch``), memory (``memory``), progress bars (``progress``),
device and dtype (``placement``), all-or-nothing outputs (``output``), wall time (``timing``)
and dependencies' noise (``quiet``)."""
