"""Volume → 2D slice items for SAM-style models, and 2D predictions → volume.

Conventions:
- Volumes are channel-first (1, X, Y, Z) in RAS voxel order (see `load_case`). A slice along `axis` is shown the
  way a radiologist views it: for an axial slice, anterior at the top and the patient's right on the image's left
  (likewise for coronal and sagittal slices). `reassemble` undoes exactly this, so predictions land back in place.
- Model size S (256 for LiteMedSAM, 1024 for SAM ViT), as in SAM: the longest side is resized to S keeping the
  aspect ratio (bilinear for images, nearest for masks), then zeros pad the bottom and right to S x S.
  `from_model_size` crops the pad and resizes back (bilinear), so thresholding happens at the slice's own size.
- Slice items are plain dicts of tensors, numbers, strings and lists, so MONAI datasets can cache them.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Resize, SpatialPad, Transform
from monai.utils import convert_to_tensor

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.datalists import case_id_from_path
from medclipsam.data.intensity import intensity_transform
from medclipsam.data.io import load_label, load_scan, to_ras
from medclipsam.errors import InputError

IMAGE_MODE = "bilinear"
MASK_MODE = "nearest-exact"
_NEAREST_MODES = ("nearest", "nearest-exact")


@dataclass(frozen=True)
class SliceGeometry:
    """How a (H, W) slice was mapped to the model's S x S input: resized to (resized_height, resized_width), padded."""

    height: int
    width: int
    size: int
    resized_height: int
    resized_width: int

    def as_dict(self) -> dict[str, int]:
        """Plain dict of ints (for slice items and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SliceGeometry":
        """Rebuild from `as_dict()` output (values may be 0-d tensors after collation)."""
        return cls(**{f.name: int(values[f.name]) for f in fields(cls)})


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain torch tensor (MONAI transforms return MetaTensors)."""
    return convert_to_tensor(tensor, track_meta=False)


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of the (1, X, Y, Z) volume), got {axis!r}")


def _plane(volume: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """Slice `index` along spatial `axis` of a (C, X, Y, Z) volume as a (C, H, W) image in viewing orientation."""
    plane = volume.select(axis + 1, index)
    return plane.flip((-2, -1)).transpose(-2, -1)


def _unplane(image: torch.Tensor) -> torch.Tensor:
    """Inverse of `_plane`'s reorientation: a (..., H, W) viewing-orientation image back to voxel order."""
    return image.transpose(-2, -1).flip((-2, -1))


def label_plane(label: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """Slice `index` of a (1, X, Y, Z) label volume as an (H, W) plane in viewing orientation (like the images)."""
    _check_axis(axis)
    return _plane(_plain(label), axis, index)[0]


def plane_shape(shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(H, W) of the slices along `axis` of a volume with spatial shape (X, Y, Z)."""
    _check_axis(axis)
    first, second = (int(n) for i, n in enumerate(shape) if i != axis)
    return second, first


def to_model_size(slice2d: torch.Tensor, size: int, mode: str = IMAGE_MODE) -> tuple[torch.Tensor, SliceGeometry]:
    """Resize a (C, H, W) slice so its longest side is `size` (aspect kept) and zero-pad bottom/right to size x size."""
    if slice2d.ndim != 3:
        raise ValueError(f"to_model_size expects a (C, H, W) slice, got shape {tuple(slice2d.shape)}")
    height, width = (int(n) for n in slice2d.shape[-2:])
    scale = size / max(height, width)
    resized = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    geometry = SliceGeometry(height, width, int(size), *resized)
    image = _plain(slice2d).float()
    if resized != (height, width):
        downscale = scale < 1.0 and mode not in _NEAREST_MODES
        image = _plain(Resize(resized, mode=mode, anti_aliasing=downscale)(image))
    return _plain(SpatialPad((size, size), method="end")(image)), geometry


def from_model_size(pred: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
    """Undo `to_model_size` on a (C, S, S) logit/probability map: crop the pad, resize back bilinear → (C, H, W)."""
    if pred.ndim != 3 or tuple(pred.shape[-2:]) != (geometry.size, geometry.size):
        raise ValueError(
            f"from_model_size expects a (C, {geometry.size}, {geometry.size}) map, got shape {tuple(pred.shape)}"
        )
    cropped = _plain(pred).float()[:, : geometry.resized_height, : geometry.resized_width]
    if (geometry.resized_height, geometry.resized_width) == (geometry.height, geometry.width):
        return cropped.contiguous()
    return _plain(Resize((geometry.height, geometry.width), mode=IMAGE_MODE)(cropped))


def load_case(item: Mapping[str, Any], modality: str = "CT", window: str | None = "abdomen") -> dict:
    """Load a datalist item's scan (and label, checked to lie on the scan's grid), reorient both to RAS and map the
    scan to [0, 1] → {"image", "label" (if any), "case_id", "image_path", "label_path", other item keys}."""
    image_path = str(item["image"])
    case = {key: value for key, value in item.items() if key not in ("image", "label")}
    case["case_id"] = str(item.get("case_id") or case_id_from_path(image_path))
    case["image_path"] = image_path
    scan = load_scan(image_path)
    if item.get("label"):
        label_path = str(item["label"])
        label = load_label(label_path, like=scan)
        if not bool(label.as_tensor().any()):
            raise InputError(label_path, "empty label: it holds no foreground voxels (every value is 0)",
                             "Check the file, or remove this case from the datalist")
        case["label"] = to_ras(label)
        case["label_path"] = label_path
    case["image"] = intensity_transform(modality, window)(to_ras(scan))
    return case


class LoadCase(Transform):
    """`load_case` as a MONAI transform, so `CacheDataset(datalist, transform=LoadCase())` caches loaded volumes."""

    def __init__(self, modality: str = "CT", window: str | None = "abdomen") -> None:
        self.modality = modality
        self.window = window

    def __call__(self, data: Mapping[str, Any]) -> dict:
        """Load one datalist item."""
        return load_case(data, self.modality, self.window)


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    """Random generator fixed by the seed and the case id (so cases differ, runs repeat)."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode("utf-8"))])


def _check_label_values(label: torch.Tensor, card: ConceptCard, where: str) -> None:
    unknown = sorted(int(v) for v in torch.unique(label).tolist() if v != 0 and int(v) not in card.concepts)
    if unknown:
        raise InputError(
            where,
            f"label values {unknown} are not in concept card {card.name!r} (its label ids: {sorted(card.concepts)})",
            "Use the card that belongs to this dataset, or add those label ids to the card",
        )


def _selected_slices(label: torch.Tensor, axis: int, empty_ratio: float, slice_step: int,
                     rng: np.random.Generator) -> list[int]:
    """Foreground slices (every `slice_step`-th) plus a seeded sample of empty slices, `empty_ratio` times as many."""
    if slice_step < 1:
        raise ValueError(f"slice_step must be a positive int, got {slice_step!r}")
    if not empty_ratio >= 0:
        raise ValueError(f"empty_ratio must be >= 0 (math.inf keeps every empty slice), got {empty_ratio!r}")
    has_foreground = label.ne(0).any(dim=tuple(d for d in range(3) if d != axis))
    foreground = torch.nonzero(has_foreground).flatten().tolist()[::slice_step]
    empty = torch.nonzero(~has_foreground).flatten().tolist()
    wanted = len(empty) if math.isinf(empty_ratio) else math.floor(empty_ratio * len(foreground) + 0.5)
    chosen = rng.choice(empty, size=min(wanted, len(empty)), replace=False).tolist() if empty else []
    return sorted(foreground + [int(i) for i in chosen])


def slice_items(
    case: Mapping[str, Any],
    card: ConceptCard,
    axis: int = 2,
    size: int = 256,
    empty_ratio: float = 0.1,
    absent_per_slice: int = 1,
    seed: int = 0,
    slice_step: int = 1,
) -> list[dict]:
    """Training items from a loaded labelled case: one per selected slice, with a binary mask per concept present
    and `absent_per_slice` sampled absent concepts (all-zero masks), at model size. Deterministic per seed."""
    _check_axis(axis)
    case_id = str(case["case_id"])
    if case.get("label") is None:
        raise InputError(case.get("image_path", case_id), "case has no label, so it cannot give training slices",
                         "Add the label path to the datalist item, or use volume_slices for inference")
    image = _plain(case["image"]).float()
    label = _plain(case["label"])[0].long()
    _check_label_values(label, card, str(case.get("label_path", case_id)))
    rng = _case_rng(seed, case_id)
    card_ids = sorted(card.concepts)
    items = []
    for index in _selected_slices(label, axis, empty_ratio, slice_step, rng):
        image_s, geometry = to_model_size(_plane(image, axis, index), size, IMAGE_MODE)
        label_plane = _plane(label[None], axis, index)[0]
        present_ids = [int(v) for v in torch.unique(label_plane).tolist() if v != 0]
        candidates = [i for i in card_ids if i not in present_ids]
        n_absent = min(max(absent_per_slice, 0), len(candidates))
        absent_ids = sorted(int(i) for i in rng.choice(candidates, size=n_absent, replace=False)) if n_absent else []
        masks = torch.zeros(len(present_ids) + n_absent, size, size)
        if present_ids:
            present_masks = torch.stack([label_plane == i for i in present_ids]).float()
            masks[: len(present_ids)] = to_model_size(present_masks, size, MASK_MODE)[0]
        label_ids = present_ids + absent_ids
        items.append({
            "image": image_s.expand(3, -1, -1),
            "masks": masks,
            "concepts": [card.concepts[i].name for i in label_ids],
            "label_ids": label_ids,
            "present": [True] * len(present_ids) + [False] * n_absent,
            "case_id": case_id,
            "slice_index": int(index),
            "axis": axis,
            "geometry": geometry.as_dict(),
        })
    return items


class SliceDataset(Dataset):
    """Slice items (from `slice_items`) as a MONAI Dataset; batch them with `collate_slices`.

    The grey image is stored once and viewed as 3 channels (`expand`): treat it as read-only.
    """

    def __init__(self, items: Sequence[dict], transform: Callable | None = None) -> None:
        super().__init__(list(items), transform)

    @classmethod
    def from_cases(
        cls,
        cases: Iterable[Mapping[str, Any]],
        card: ConceptCard,
        transform: Callable | None = None,
        modality: str = "CT",
        window: str | None = "abdomen",
        **slice_options: Any,
    ) -> "SliceDataset":
        """Load each datalist item (`load_case`) and slice it (`slice_items` with `slice_options`)."""
        items: list[dict] = []
        for entry in cases:
            case = entry if isinstance(entry.get("image"), torch.Tensor) else load_case(entry, modality, window)
            items += slice_items(case, card, **slice_options)
        return cls(items, transform)


def collate_slices(batch: Sequence[Mapping[str, Any]]) -> dict:
    """Batch slice items whose number of concepts K varies: masks are padded to the batch's largest K.

    Returns "image" (B, 3, S, S); "masks" (B, Kmax, S, S) zero-padded; "valid" (B, Kmax) bool, False on padding;
    "label_ids" (B, Kmax) long, -1 on padding; "present" (B, Kmax) bool; "slice_index", "axis" (B,) long; and
    "concepts", "case_id", "geometry" and any other keys as lists (one entry per item).
    Padding (rather than lists) lets a model run all concepts of a batch as one tensor and mask the loss.
    """
    if not batch:
        raise ValueError("collate_slices: empty batch")
    size = int(batch[0]["image"].shape[-1])
    k_max = max(len(item["label_ids"]) for item in batch)
    masks = torch.zeros(len(batch), k_max, size, size)
    valid = torch.zeros(len(batch), k_max, dtype=torch.bool)
    present = torch.zeros(len(batch), k_max, dtype=torch.bool)
    label_ids = torch.full((len(batch), k_max), -1, dtype=torch.long)
    for row, item in enumerate(batch):
        k = len(item["label_ids"])
        masks[row, :k] = item["masks"]
        valid[row, :k] = True
        present[row, :k] = torch.as_tensor(item["present"], dtype=torch.bool)
        label_ids[row, :k] = torch.as_tensor(item["label_ids"], dtype=torch.long)
    collated: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in batch]),
        "masks": masks,
        "valid": valid,
        "label_ids": label_ids,
        "present": present,
        "slice_index": torch.as_tensor([item["slice_index"] for item in batch], dtype=torch.long),
        "axis": torch.as_tensor([item["axis"] for item in batch], dtype=torch.long),
    }
    for key in batch[0]:
        if key not in collated:
            collated[key] = [item[key] for item in batch]
    return collated


def volume_slices(
    image: torch.Tensor, axis: int = 2, size: int = 256
) -> Iterator[tuple[int, torch.Tensor, SliceGeometry]]:
    """Every slice of a (1, X, Y, Z) [0, 1] volume as (index, (3, S, S) model input, geometry), for inference."""
    _check_axis(axis)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"volume_slices expects a (1, X, Y, Z) volume, got shape {tuple(image.shape)}")
    volume = _plain(image).float()
    for index in range(volume.shape[axis + 1]):
        slice_s, geometry = to_model_size(_plane(volume, axis, index), size, IMAGE_MODE)
        yield index, slice_s.expand(3, -1, -1), geometry


def reassemble(
    slice_preds: Mapping[int, torch.Tensor], shape: tuple[int, int, int], axis: int = 2
) -> torch.Tensor:
    """Place (H, W) slice predictions back into an (X, Y, Z) volume (RAS voxel order, like the input to
    `volume_slices`); slices without a prediction are 0. The volume has the predictions' dtype."""
    expected = plane_shape(shape, axis)
    dtype = next(iter(slice_preds.values())).dtype if slice_preds else torch.int64
    volume = torch.zeros(tuple(int(n) for n in shape), dtype=dtype)
    for index, pred in slice_preds.items():
        if not 0 <= int(index) < shape[axis]:
            raise ValueError(f"reassemble: slice index {index} is outside 0..{shape[axis] - 1} along axis {axis}")
        if tuple(pred.shape) != expected:
            raise ValueError(f"reassemble: slice {index} has shape {tuple(pred.shape)}, expected {expected} "
                             f"for volume shape {tuple(shape)} along axis {axis}")
        volume.select(axis, int(index)).copy_(_unplane(_plain(pred).to(dtype)))
    return volume
