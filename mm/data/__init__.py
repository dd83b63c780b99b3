"""Data: image decoding and preprocessing, tiling (more to come: conversations, packing, pipelines)."""
