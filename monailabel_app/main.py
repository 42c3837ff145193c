"""medclipsam served by MONAI Label (`monailabel start_server --app monailabel_app --studies FOLDER`), for 3D Slicer's
MONAI Label module and OHIF: one infer task, "medclipsam", whose labels are the concept card's organ names.

Settings (`--conf KEY VALUE`): model ("default": the shipped model, a folder written by `medclipsam train`, or a
method name), card (concept card naming the organs and their label values; default phantom), device (auto, cpu,
cuda), batch_size (slices per model batch, default 4 on a CPU, 8 on CUDA), cleanup (3D clean-up, default true),
cached_images (images whose slice encodings are kept for refinement, default 2).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.utils.others.generic import strtobool

from medclipsam import __version__
from medclipsam.data.concepts import load_card
from medclipsam.inference.predictor import Predictor, pick_device
from medclipsam.models import factory
from medclipsam.models.checkpoints import read_checkpoint

from lib.inferer import PredictorInferer
from lib.infers import MedClipSamInfer
from lib.sessions import Sessions

MODEL_NAME = "medclipsam"


def _vocabulary(source: str) -> list[str]:
    """The organs a checkpoint was trained on ([] for an open vocabulary or a method name); a source that is neither
    a checkpoint folder nor a method stops the server at start, with the reason."""
    folder = factory.default_model_path() if source == factory.DEFAULT_MODEL else Path(source)
    if folder.is_dir():
        return read_checkpoint(folder).concepts
    factory.method_builder(source)
    return []


class MedClipSamApp(MONAILabelApp):
    """Organ segmentation by name with medclipsam's predictor; clicks and boxes refine one organ at a time."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.card = load_card(conf.get("card", "phantom"))
        self.model_source = conf.get("model", factory.DEFAULT_MODEL)
        vocabulary = _vocabulary(self.model_source)
        self.label_ids = {name: self.card.resolve(name).label_id for name in self.card.names()
                          if not vocabulary or name in vocabulary}
        self.device = pick_device(conf.get("device", "auto"))
        self.batch_size = int(conf["batch_size"]) if "batch_size" in conf else None
        self.cleanup = bool(strtobool(conf.get("cleanup", "true")))
        self.cached_images = int(conf.get("cached_images", "2"))
        self._model: Any = None
        self._model_lock = threading.Lock()
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medclipsam",
                         description="CLIP-Guided SAM: organs segmented by name, refined with clicks or a box",
                         version=__version__)

    def _predictor(self) -> Predictor:
        """A predictor for a new image; the model is loaded once, on the first request."""
        with self._model_lock:
            if self._model is None:
                self._model = factory.create_model(self.model_source, concepts=list(self.label_ids),
                                                   device=self.device)
        return Predictor(self._model, device=self.device, batch_size=self.batch_size, cleanup=self.cleanup)

    def init_infers(self) -> dict[str, InferTask]:
        sessions = Sessions(self._predictor, size=self.cached_images)
        inferer = PredictorInferer(sessions, self.card, list(self.label_ids))
        description = (f"medclipsam {self.model_source} model, card {self.card.name!r}: organs by name "
                       '("organs"), refined with clicks or a box')
        return {MODEL_NAME: MedClipSamInfer(inferer, self.label_ids, description)}
