"""The model's common frame: axial slices centred on the body at a fixed number of mm per pixel, whatever the
scanner's matrix, pixel size and field of view, and the exact way back to the scan's own grid.

A frame is `size` x `size` pixels covering `field_of_view_mm` on each side, centred on the body's bounding box
(body mask from intensity, table and clothing detached, largest 3D component), optionally resampled along z to a
working slice spacing. Slices are shown as a radiologist views them: anterior at the top, the patient's right on the
image's left. Every frame axis is parallel to an axis of the RAS volume, so the mapping between a frame pixel and a
scan voxel is a scale and a shift per axis: resampling in both directions is separable, exact and done in chunks of
slices (a 512 x 512 x 300 CT never needs a full-resolution sampling grid in memory).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medclipsam.errors import InputError

CT_AIR_HU = -1024.0
CHUNK_SLICES = 16  # slices resampled at a time (bounds the sampling grid and the full-resolution output chunk)
_BODY_GRID_MM = 4.0  # the body mask is found on a grid this coarse (it only has to place the frame's centre)
_OPENING_MM = 8.0  # opening radius that detaches the table, pads and clothing from the body
FITS = ("body", "scan")
_BONE_HU = 200.0


@dataclass(frozen=True)
class FrameSettings:
    """How a scan becomes model input: frame size and field of view, working slice spacing, modality and window.

    Saved with every trained model, so inference replays exactly what training did.
    """

    size: int = 256
    field_of_view_mm: float = 400.0  # an adult abdomen fits; LiteMedSAM saw 1.4-2 mm pixels in training
    slice_spacing_mm: float | None = None  # None keeps the scan's own slices
    modality: str = "CT"
    window: str | None = "abdomen"
    body_threshold_hu: float = -500.0  # CT: voxels above this are body (MR: a share of the 99th percentile)
    fit: str = "body"  # "body": centred on the body at pixel_mm; "scan": the whole slice resized by its longest
    # side and padded bottom/right, in pixels whatever their mm (how models before the physical frame were trained)

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise InputError(None, f"frame fit {self.fit!r} is not one of {FITS}", "use fit='body' (or 'scan' for "
                             "models trained before the physical frame)")
        if self.size < 8 or self.field_of_view_mm <= 0:
            raise InputError(None, f"frame size {self.size} px / field of view {self.field_of_view_mm} mm",
                             "use a size of at least 8 pixels and a positive field of view")

    @property
    def pixel_mm(self) -> float:
        """Frame pixel size in mm."""
        return self.field_of_view_mm / self.size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FrameSettings":
        """Inverse of `to_dict`; unknown keys are an error (settings from another version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(None, f"unknown frame settings {unknown}", f"known settings: {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class AxisMap:
    """source index = offset + step * frame index, along one axis."""

    offset: float
    step: float

    def to_source(self, index: np.ndarray | float) -> np.ndarray | float:
        """Source (fractional) indices of frame indices."""
        return self.offset + self.step * np.asarray(index, dtype=np.float64)

    def to_frame(self, index: np.ndarray | float) -> np.ndarray | float:
        """Frame (fractional) indices of source indices."""
        return (np.asarray(index, dtype=np.float64) - self.offset) / self.step


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (norms of the affine's columns)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _body_threshold(volume: np.ndarray, settings: FrameSettings) -> float:
    if settings.modality.upper() == "CT":
        return settings.body_threshold_hu
    return 0.1 * float(np.percentile(volume, 99.0))


def body_centre(volume: np.ndarray, spacing: np.ndarray, settings: FrameSettings) -> tuple[float, float]:
    """(x, y) voxel centre of the body in an (X, Y, Z) RAS volume: the centre of its bounding box, or, on a CT whose
    field of view cuts the body on one side only, left-right at the spine (the median x of the bone in the body's
    posterior half), since the box of a truncated body is not centred on it; the volume's centre when no body is
    found (e.g. a blank scan)."""
    steps = [max(1, int(round(_BODY_GRID_MM / s))) for s in spacing[:2]]
    steps.append(max(1, int(math.ceil(volume.shape[2] / 64))))
    coarse = volume[::steps[0], ::steps[1], ::steps[2]]
    mask = coarse > _body_threshold(volume, settings)
    radius = max(1, int(round(_OPENING_MM / _BODY_GRID_MM)))
    disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    mask = ndimage.binary_opening(mask, structure=disk[:, :, None])
    components, count = ndimage.label(mask)
    if count == 0:
        return (volume.shape[0] - 1) / 2.0, (volume.shape[1] - 1) / 2.0
    body = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    xs, ys, _ = ndimage.find_objects(body.astype(np.uint8))[0]
    centre_x = (xs.start + xs.stop - 1) / 2.0 * steps[0]
    centre_y = (ys.start + ys.stop - 1) / 2.0 * steps[1]
    cut_left, cut_right = body[0].any(), body[-1].any()
    if settings.modality.upper() == "CT" and cut_left != cut_right:
        posterior = np.zeros_like(body)
        posterior[:, ys.start:(ys.start + ys.stop) // 2 + 1] = True
        bone = np.nonzero((coarse > _BONE_HU) & body & posterior)[0]
        if bone.size:
            centre_x = float(np.median(bone)) * steps[0]
    return centre_x, centre_y


def _normalised(index: np.ndarray, length: int) -> np.ndarray:
    """grid_sample coordinates (align_corners=True) of fractional indices along an axis of `length` samples; an
    index within the first or last sample's footprint (half a sample beyond its centre) takes that sample."""
    inside = (index >= -0.5) & (index <= length - 0.5)
    index = np.where(inside, np.clip(index, 0, length - 1), index)
    if length == 1:
        return np.where(inside, 0.0, 2.0)
    return 2.0 * index / (length - 1) - 1.0


def _antialias(volume: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    """Gaussian low-pass along every axis that is downsampled by `factor` > 1 (sigma (factor - 1) / 2 samples)."""
    sigmas = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if not any(sigmas):
        return volume
    smoothed = ndimage.gaussian_filter(volume.numpy(), sigma=[0.0, *sigmas], mode="nearest")
    return torch.from_numpy(smoothed)


@dataclass(frozen=True)
class VolumeFrame:
    """The frame of one RAS volume: per-axis maps frame pixel -> source voxel (column -> x, row -> y, slice -> z)."""

    settings: FrameSettings
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    columns: AxisMap
    rows: AxisMap
    slices_: AxisMap
    slice_count: int

    @property
    def slice_mm(self) -> float:
        """Frame slice spacing in mm."""
        return float(abs(self.slices_.step) * voxel_spacing(self.source_affine)[2])

    def frame_indices(self, voxels: np.ndarray) -> np.ndarray:
        """(N, 3) source voxel indices (x, y, z) -> (N, 3) fractional frame (column, row, slice)."""
        voxels = np.atleast_2d(np.asarray(voxels, dtype=np.float64))
        return np.stack([self.columns.to_frame(voxels[:, 0]), self.rows.to_frame(voxels[:, 1]),
                         self.slices_.to_frame(voxels[:, 2])], axis=1)

    def _along_z(self, volume: torch.Tensor, count: int, index_map: AxisMap, length: int,
                 nearest: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks (start, (C, A, B, n)) of `volume` (C, A, B, length) sampled at `index_map.to_source(i)`, i < count."""
        for start in range(0, count, CHUNK_SLICES):
            where = index_map.to_source(np.arange(start, min(start + CHUNK_SLICES, count)))
            where = np.clip(where, 0, length - 1)
            if nearest:
                yield start, volume[..., torch.from_numpy(np.rint(where).astype(np.int64))]
                continue
            low = np.floor(where).astype(np.int64)
            high = torch.from_numpy(np.minimum(low + 1, length - 1))
            weight = torch.from_numpy(where - low).to(volume.dtype)
            yield start, volume[..., torch.from_numpy(low)] * (1 - weight) + volume[..., high] * weight

    def slices(self, volume: torch.Tensor, nearest: bool = False, pad: float = 0.0) -> torch.Tensor:
        """(C, X, Y, Z) source volume -> (Zf, C, S, S) frame slices in viewing orientation (bilinear, antialiased
        when downsampling, or nearest for labels); frame pixels outside the scan take `pad`."""
        volume = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
        volume = volume - pad if pad else volume  # no full-volume copy for the usual pad of 0
        if not nearest:
            volume = _antialias(volume, (abs(self.columns.step), abs(self.rows.step), abs(self.slices_.step)))
        size = self.settings.size
        grid = self._plane_grid(size, size)
        out = torch.empty(self.slice_count, volume.shape[0], size, size)
        for start, chunk in self._along_z(volume, self.slice_count, self.slices_, volume.shape[3], nearest):
            planes = chunk.permute(3, 0, 1, 2)  # (n, C, X, Y): rows of grid_sample's input are x, columns y
            sampled = F.grid_sample(planes, grid.expand(len(planes), -1, -1, -1),
                                    mode="nearest" if nearest else "bilinear", padding_mode="zeros",
                                    align_corners=True)
            out[start:start + len(planes)] = sampled
        return out + pad if pad else out

    def moved(self, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> "VolumeFrame":
        """This frame with its field of view scaled by `scale` about its centre and moved by `shift` (columns, rows)
        of its own pixels: another view of the same slices, for test-time augmentation."""
        half = (self.settings.size - 1) / 2.0
        maps = []
        for axis, moved_by in zip((self.columns, self.rows), shift):
            centre = axis.to_source(half + moved_by)
            maps.append(AxisMap(float(centre - axis.step * scale * half), axis.step * scale))
        return replace(self, columns=maps[0], rows=maps[1])

    def resample_from(self, other: "VolumeFrame", values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Zf, K, S, S) values of `other` (a moved view of the same slices) on this frame's pixels (bilinear), and
        (S, S) where `other` covers them (1 inside its frame, 0 outside, fractional at its edge)."""
        size = self.settings.size
        column = _normalised(other.columns.to_frame(self.columns.to_source(np.arange(size))), other.settings.size)
        row = _normalised(other.rows.to_frame(self.rows.to_source(np.arange(size))), other.settings.size)
        grid = torch.from_numpy(np.stack(np.broadcast_arrays(column[None, :], row[:, None]), axis=-1)).float()[None]
        values = torch.as_tensor(values, dtype=torch.float32)
        sampled = F.grid_sample(values, grid.expand(len(values), -1, -1, -1), mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        ones = torch.ones(1, 1, other.settings.size, other.settings.size)
        covered = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        return sampled, covered

    def _plane_grid(self, rows: int, columns: int) -> torch.Tensor:
        """(1, rows, columns, 2) grid_sample grid of frame pixels in a source plane stored as (X, Y)."""
        x = _normalised(self.columns.to_source(np.arange(columns)), self.source_shape[0])
        y = _normalised(self.rows.to_source(np.arange(rows)), self.source_shape[1])
        grid = np.empty((rows, columns, 2))
        grid[..., 0], grid[..., 1] = y[:, None], x[None, :]  # grid_sample: (index along Y, index along X)
        return torch.from_numpy(grid).float()[None]

    def _source_grid(self) -> torch.Tensor:
        """(1, X, Y, 2) grid_sample grid of source voxels in a frame slice stored as (rows, columns)."""
        size = self.settings.size
        column = _normalised(self.columns.to_frame(np.arange(self.source_shape[0])), size)
        row = _normalised(self.rows.to_frame(np.arange(self.source_shape[1])), size)
        grid = np.empty((self.source_shape[0], self.source_shape[1], 2))
        grid[..., 0], grid[..., 1] = column[:, None], row[None, :]  # grid_sample: (column, row)
        return torch.from_numpy(grid).float()[None]

    def to_source_chunks(self, values: torch.Tensor, nearest: bool = False
                         ) -> Iterator[tuple[int, torch.Tensor]]:
        """(Zf, K, S, S) frame values -> chunks (z start, (K, X, Y, n)) on the source grid (0 outside the frame)."""
        values = torch.as_tensor(values, dtype=torch.float32)
        stack = values.permute(1, 2, 3, 0)  # (K, S, S, Zf) so slices sit on the last axis
        inverse = AxisMap(-self.slices_.offset / self.slices_.step, 1.0 / self.slices_.step)
        grid = self._source_grid()
        for start, chunk in self._along_z(stack, self.source_shape[2], inverse, self.slice_count, nearest):
            planes = chunk.permute(3, 0, 1, 2)  # (n, K, S, S)
            sampled = F.grid_sample(planes, grid.expand(len(planes), -1, -1, -1),
                                    mode="nearest" if nearest else "bilinear", padding_mode="zeros",
                                    align_corners=True)
            yield start, sampled.permute(1, 2, 3, 0)

    def to_source(self, values: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        """(Zf, K, S, S) frame values -> (K, X, Y, Z) on the source grid (for small K; see `labels_to_source`)."""
        out = torch.zeros(values.shape[1], *self.source_shape)
        for start, chunk in self.to_source_chunks(values, nearest):
            out[..., start:start + chunk.shape[-1]] = chunk
        return out

    def labels_to_source(self, probabilities: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
        """(Zf, K, S, S) frame probabilities -> (X, Y, Z) uint8 labels 1..K on the source grid: each voxel takes the
        most probable concept where its probability exceeds `threshold` (probabilities interpolated, not labels)."""
        labels = np.zeros(self.source_shape, dtype=np.uint8)
        for start, chunk in self.to_source_chunks(probabilities):
            best, which = chunk.max(dim=0)
            labels[..., start:start + chunk.shape[-1]] = torch.where(best > threshold, which + 1, 0).numpy()
        return labels


def _body_maps(array: np.ndarray, spacing: np.ndarray, settings: FrameSettings) -> tuple[AxisMap, AxisMap]:
    """Column and row maps of a frame centred on the body at `settings.pixel_mm` (column 0: the patient's right,
    row 0: anterior)."""
    centre_x, centre_y = body_centre(array, spacing, settings)
    half = (settings.size - 1) / 2.0
    pixel = settings.pixel_mm
    return (AxisMap(centre_x + half * pixel / spacing[0], -pixel / spacing[0]),
            AxisMap(centre_y + half * pixel / spacing[1], -pixel / spacing[1]))


def _scan_maps(array: np.ndarray, spacing: np.ndarray, settings: FrameSettings) -> tuple[AxisMap, AxisMap]:
    """Column and row maps of the whole slice resized (half-pixel centres, as torch and MONAI resize) so its
    longest side in pixels is `settings.size`, the rest padded at the bottom and right."""
    width, height = array.shape[0], array.shape[1]
    scale = settings.size / max(width, height)
    maps = []
    for length in (width, height):
        resized = max(1, int(length * scale + 0.5))
        step = length / resized
        maps.append(AxisMap(length - 0.5 - 0.5 * step, -step))
    return maps[0], maps[1]


def fit_frame(volume: Any, settings: FrameSettings, affine: np.ndarray | None = None) -> VolumeFrame:
    """The frame of a (1, X, Y, Z) or (X, Y, Z) RAS volume in raw intensities (HU for CT), with its affine (taken
    from a MetaTensor when not given): centred on the body, `settings.size` pixels at `settings.pixel_mm`."""
    affine = np.asarray(getattr(volume, "affine", None) if affine is None else affine, dtype=np.float64)
    array = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or affine.shape != (4, 4):
        raise InputError(None, f"a frame needs a 3D volume with a 4x4 affine, got shape {array.shape} and affine "
                         f"{affine.shape}", "load scans with medclipsam.data.io.load_scan and to_ras")
    spacing = voxel_spacing(affine)
    columns, rows = (_body_maps if settings.fit == "body" else _scan_maps)(array, spacing, settings)
    depth = array.shape[2]
    count = depth
    if settings.slice_spacing_mm is not None and depth > 1:
        count = min(depth, max(2, int(round((depth - 1) * spacing[2] / settings.slice_spacing_mm)) + 1))
    slices_ = AxisMap(0.0, (depth - 1) / (count - 1) if count > 1 else 1.0)  # first and last slices coincide
    return VolumeFrame(settings, tuple(int(n) for n in array.shape), affine, columns, rows, slices_, count)
