"""Infer tasks of the app."""
from lib.infers.medclipsam_infer import MedClipSamInfer

__all__ = ["MedClipSamInfer"]
