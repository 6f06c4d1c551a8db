"""Digits: a small MLP or CNN on scikit-learn's 8x8 handwritten digits (ours; the "Beyond the paper" study)."""
