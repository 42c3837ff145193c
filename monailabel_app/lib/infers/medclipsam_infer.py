"""medclipsam as a MONAI Label infer task: the card's organ names are the model's labels; a request segments organs by
name, and clicks or a box refine one organ on the image's cached predictor (DeepEdit-style, so 3D Slicer offers
both auto-segmentation and click editing)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from medclipsam.errors import MedClipSamError

from lib.inferer import PredictorInferer
from lib.prompts import BACKGROUND
from lib.transforms import LoadScand, WriteLabeld

_INVALID_REQUEST = 422


class MedClipSamInfer(BasicInferTask):
    """Segment organs by name (request "organs", default: every label) and refine them with clicks or a box."""

    def __init__(self, inferer: PredictorInferer, label_ids: Mapping[str, int], description: str,
                 config: dict[str, Any] | None = None) -> None:
        labels = {**label_ids, BACKGROUND: 0}  # DeepEdit clients offer "background" for negative clicks
        options = {"organs": "", **(config or {})}  # shown as an editable option by 3D Slicer; empty: every label
        super().__init__(path=None, network=None, type=InferType.DEEPEDIT, labels=labels, dimension=3,
                         description=description, config=options)
        self.label_ids = dict(label_ids)
        self._inferer = inferer

    def is_valid(self) -> bool:
        """The model is built by medclipsam's factory, not loaded from a MONAI Label model file."""
        return True

    def pre_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
        return [LoadScand(keys="image")]

    def inferer(self, data: Mapping[str, Any] | None = None) -> PredictorInferer:
        return self._inferer

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        """The predictor answers on the whole volume (it batches slices itself), so no batch dimension is added."""
        return self.inferer(data)(data)

    def post_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
        return [WriteLabeld(keys="pred", label_ids=self.label_ids)]

    def writer(self, data: Mapping[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """The label map the post transform wrote, and the per-organ summary."""
        return data["pred_path"], data["result"]

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str | None, dict]:
        """Run the task; a request medclipsam cannot use gets HTTP 422 with the reason, not a bare server error."""
        try:
            return super().__call__(request, callbacks)
        except MedClipSamError as error:
            raise HTTPException(status_code=_INVALID_REQUEST, detail=str(error)) from error
