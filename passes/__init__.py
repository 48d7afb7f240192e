"""FX graph passes: instrument, plan, rewrite."""
