"""Pieces the MONAI bundle in `configs/` builds with `_target_`: training engines and handlers, method checkpoints,
inference and evaluation runners."""
