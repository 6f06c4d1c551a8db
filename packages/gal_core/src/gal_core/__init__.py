"""Gradient Adjustment Learning (Luo et al., IEEE TMM 2023): learn to minimise the Taylor remainder."""
from .adjuster import COMPUTE_DTYPES, POLICIES, PROPOSALS, REMAINDERS, SOURCES, GradientAdjuster
from .stats import GALStats, float32_spacing
from .modules import count_parameters

__all__ = ["GradientAdjuster", "GALStats", "count_parameters", "float32_spacing", "POLICIES", "REMAINDERS", "SOURCES",
           "PROPOSALS", "COMPUTE_DTYPES"]
__version__ = "0.1.0"
