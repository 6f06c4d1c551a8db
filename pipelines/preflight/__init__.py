"""Preflight: every training run of a profile at its real size for a few steps (python -m pipelines.preflight)."""
