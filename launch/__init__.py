"""Entry points (mm-train, mm-convert, quickstart) and cluster launchers."""
