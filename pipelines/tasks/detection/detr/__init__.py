"""DETR for COCO detection, with its loss split for GAL (see detr.py's docstring)."""
from .backbone import pad_images
from .detr import DETR, DetrLoss, PostProcess, SetCriterion, build_detr
from .matcher import HungarianMatcher

__all__ = ["DETR", "DetrLoss", "HungarianMatcher", "PostProcess", "SetCriterion", "build_detr", "pad_images"]
