"""Stage two: the CLIP-CAER head (temporal encoders, fusion, prompts), training and metrics."""
