"""Prepare stages: fetch a dataset's raw file(s), parse, verify, and write data/processed/ (see CONTRACT.md)."""
