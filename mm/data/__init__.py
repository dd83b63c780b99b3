"""Data: images (decode, pad, CATTY tiling), conversations (templates, exact masks), packing, the Grain
pipeline, sources (LLaVA JSON, ArrayRecord, TFDS), skip counters, generated demo data. See README.md here."""
