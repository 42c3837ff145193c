"""Synthetic abdominal CT phantoms: organs as smooth random shapes at realistic HU, from a seed, no download needed.

`make_phantom(seed)` is the classic phantom (one small grid, anatomy fitted to it; tests and the shipped model use
it). `make_scanner_phantom(seed)` images the same kind of anatomy at its physical size with a realistic scanner
geometry (`ScannerGeometry`, drawn by `scanner_geometry(seed)`): 512 matrix, 0.6-1.0 mm pixels, 0.625-5 mm slices,
table, arms, off-centre patient, contrast phase, slice-dependent noise. Labels follow the `phantom` concept card.

Modules: canvas (drawing surface and shapes), layout (per-case variation, contrast), anatomy (organs), classic,
geometry, surroundings (table, pad, arms), scanner, dataset (MSD-layout writer), files (atomic NIfTI/text writes).
"""
from .classic import DEFAULT_SHAPE, DEFAULT_SPACING, PHANTOM_CARD, Phantom, make_phantom, phantom_affine
from .dataset import write_phantom_dataset
from .geometry import ScannerGeometry, scanner_geometry
from .scanner import make_scanner_phantom

__all__ = ["DEFAULT_SHAPE", "DEFAULT_SPACING", "PHANTOM_CARD", "Phantom", "ScannerGeometry", "make_phantom",
           "make_scanner_phantom", "phantom_affine", "scanner_geometry", "write_phantom_dataset"]
