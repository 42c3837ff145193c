"""Pre and post transforms of the task: the image read as medclipsam reads every scan (NIfTI, NRRD/MHA, DICOM series
folder; native orientation and affine), and the label map written back in that image's exact geometry."""
from __future__ import annotations

import math
import tempfile
from typing import Any, Mapping

from monai.transforms import MapTransform

from medclipsam.data.io import load_scan


class LoadScand(MapTransform):
    """Replace the image path under each key by the scan (1, X, Y, Z) with its affine, keeping the path under
    "<key>_path"."""

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d.setdefault(f"{key}_path", d[key])
            d[key] = load_scan(d[key])
        return d


class WriteLabeld(MapTransform):
    """Write the Segmentation under each key as a NIfTI label map in the input's own geometry (values: the card's
    label ids) to a temporary file, put its path under "<key>_path" and a per-organ summary under "result"."""

    def __init__(self, keys: str, label_ids: Mapping[str, int]) -> None:
        super().__init__(keys)
        self.label_ids = dict(label_ids)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            segmentation = d[key]
            values = {organ: self.label_ids[organ] for organ in segmentation.concepts}
            with tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix="medclipsam-", delete=False) as handle:
                path = handle.name
            d[f"{key}_path"] = str(segmentation.save(path, values=values, overwrite=True))
            organs = {}
            for organ in segmentation.concepts:
                voxels = int(segmentation.mask(organ).sum())
                score = segmentation.confidence.get(organ, math.nan)
                organs[organ] = {"label": values[organ], "present": voxels > 0, "voxels": voxels,
                                 "confidence": None if math.isnan(score) else round(float(score), 4)}
            d["result"] = {"organs": organs, "refined": d.get("refined", []),
                           "reused_encodings": bool(d.get("reused_encodings", False))}
        return d
