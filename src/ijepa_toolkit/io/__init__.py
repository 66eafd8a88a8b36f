"""Bottom-layer file handling: safe reading of checkpoints and atomic writes."""
