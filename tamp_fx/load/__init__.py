"""Load: model sources (a Hugging Face directory, a GGUF file, a ``.pt2`` program), where a
model's language decoder lives (``adapters``), processors, checkpoint indexes and layer
materialising (``checkpoint``), and model fingerprints."""
