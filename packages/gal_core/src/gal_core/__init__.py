"""Gradient Adjustment Learning (Luo et al., IEEE TMM 2023): learn to minimise the Taylor remainder."""
from .adjuster import POLICIES, REMAINDERS, SOURCES, GALStats, GradientAdjuster
from .modules import count_parameters

__all__ = ["GradientAdjuster", "GALStats", "count_parameters", "POLICIES", "REMAINDERS", "SOURCES"]
__version__ = "0.1.0"
