"""One predictor for every model and every entry point: `set_volume(scan)` prepares the scan once, `predict(concepts,
boxes=None, points=None)` answers, `refine(...)` re-runs one organ with a box or clicks, reusing what is cached.

In the shape of segment_anything's `SamPredictor` (embed once, prompt many times) and nnU-Net's predictor (replay the
preprocessing the model was trained with, bring the result back to the scan's geometry): the scan goes to RAS, into
the model's frame (`medclipsam.data.frame`: body-centred, fixed mm per pixel) and window; each slice is encoded once,
on first need, and the encoding is shared by every concept and every later call; probabilities are mapped back to
the scan's own grid, where overlaps go to the most probable concept and the 3D clean-up runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from medclipsam.data.frame import FrameSettings, VolumeFrame, fit_frame
from medclipsam.data.intensity import intensity_transform
from medclipsam.data.io import load_scan, save_mask, to_ras
from medclipsam.errors import InputError
from medclipsam.inference.cleanup import clean_label_map
from medclipsam.inference.openvino_encoder import (OpenVINOImagePath, check_runtime, encode_slices,
                                                   image_path_runtime)
from medclipsam.models.prompts import SlicePrompts

# Test-time augmentation: the model's frame, then that frame scaled by 0.9 and 1.1 and moved by 6 pixels (9.4 mm in the
# default 400 mm frame) along both axes, both ways: well inside the training augmentation (scale 0.85-1.15, shifts up
# to 8% of the side); each a (field-of-view scale, (columns, rows) shift). Laterality is part of the concepts
# ("left kidney"), so no view is mirrored.
TEST_TIME_VIEWS = ((1.0, (0.0, 0.0)), (0.9, (0.0, 0.0)), (1.1, (0.0, 0.0)), (1.0, (6.0, 6.0)), (1.0, (-6.0, -6.0)))
Box3D = Sequence[float]  # (x0, y0, z0, x1, y1, z1), inclusive voxel indices of the RAS volume
Point3D = Sequence[float]  # (x, y, z) or (x, y, z, label): label 1 (default) on the organ, 0 off it


class SliceModel(Protocol):
    """What the predictor needs of a model: its frame, a slice encoder (features: a tensor, or an object with
    `select`, `cat` and `to(device, dtype)`), and a segmenter of encoded slices. A model may also have a
    `prompt_frame` for boxes and clicks, a `frozen_image_path()` module with `features(images, *outputs)` that an
    inference runtime may run in place of `encode`, a `slice_gate` (`medclipsam.models.slice_gate.SliceGate`) and
    `organ_offsets` (`medclipsam.models.organ_offsets.OrganOffsets`)."""

    frame: FrameSettings

    def encode(self, images: torch.Tensor) -> Any: ...

    def segment(self, features: Any, concepts: Sequence[str],
                prompts: SlicePrompts | None) -> tuple[torch.Tensor, torch.Tensor]: ...


def select(features: Any, index: torch.Tensor) -> Any:
    """The encoded slices at `index` (a tensor or a features object with `select`)."""
    return features[index] if isinstance(features, torch.Tensor) else features.select(index)


def concatenate(parts: Sequence[Any]) -> Any:
    """Encoded slices of several batches as one batch."""
    return torch.cat(list(parts)) if isinstance(parts[0], torch.Tensor) else type(parts[0]).cat(parts)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": CUDA when available, else the CPU; otherwise the named device, checked to exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(None, f"device {device!r} is not a device name", "use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device}: CUDA is not available on this machine", "use cpu or auto")
    return chosen


@dataclass
class Segmentation:
    """K concepts on the RAS volume's grid: labels 1..K (list order), per-concept confidence (mean predicted IoU
    over the slices where it was found; NaN when never found or the model has no IoU head)."""

    labels: np.ndarray  # (X, Y, Z) uint8
    concepts: list[str]
    confidence: dict[str, float]
    affine: np.ndarray
    scan: MetaTensor = field(repr=False)

    def mask(self, concept: str) -> np.ndarray:
        """Boolean (X, Y, Z) mask of one concept."""
        return self.labels == self.concepts.index(concept) + 1

    def recoded(self, values: Mapping[str, int]) -> np.ndarray:
        """The label map with each concept's value replaced by `values[concept]` (e.g. a concept card's ids)."""
        out = np.zeros(self.labels.shape, dtype=np.min_scalar_type(max([*values.values(), 1])))
        for value, concept in enumerate(self.concepts, start=1):
            out[self.labels == value] = values[concept]
        return out

    def as_metatensor(self, values: Mapping[str, int] | None = None) -> MetaTensor:
        """(1, X, Y, Z) labels (1..K, or `values` per concept) with the RAS affine, for `save_mask(..., like=scan)`,
        which reorients them to the scan's own orientation."""
        labels = self.labels if values is None else self.recoded(values)
        return MetaTensor(torch.from_numpy(labels)[None], affine=torch.as_tensor(self.affine))

    def save(self, path: str | Path, values: Mapping[str, int] | None = None, overwrite: bool = False) -> Path:
        """Write the labels (1..K, or `values` per concept) as NIfTI in the scan's exact geometry, atomically."""
        return save_mask(self.as_metatensor(values), like=self.scan, path=path, overwrite=overwrite)


@dataclass
class View:
    """The scan in one frame: the frame, its windowed slices, the precision the model runs in on them (None: full)
    and the slice encodings made so far (kept for later calls unless `keep` is False)."""

    frame: VolumeFrame
    images: torch.Tensor
    precision: torch.dtype | None = None
    encoded: dict[int, Any] = field(default_factory=dict)
    keep: bool = True


def default_batch_size(device: torch.device) -> int:
    """Slices per model batch when none is given: 4 on a CPU (measured on a 300-slice CT with 5 organs: peak 3.6 GB
    instead of 4.7 GB with 8, the same masks, no slower), 8 on CUDA."""
    return 8 if device.type == "cuda" else 4


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision automatic mixed precision runs in on `device`: float16 on CUDA, bfloat16 on a CPU with
    AMX tiles (where oneDNN multiplies bfloat16 natively), None (full precision) elsewhere."""
    if device.type == "cuda":
        return torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return torch.bfloat16 if device.type == "cpu" and amx() else None


class Predictor:
    """Holds a model; `set_volume` prepares a scan, `predict` and `refine` segment organs in it by name.

    Text-only concepts are seen in the model's frame (`model.frame`); prompted ones in the frame the model answers
    prompts in (`model.prompt_frame`, e.g. the pristine backbone's own preprocessing), the same frame unless the
    model says otherwise.
    """

    def __init__(self, model: SliceModel, device: str | torch.device = "auto", batch_size: int | None = None,
                 amp: bool = True, cleanup: bool = True, threshold: float = 0.5,
                 progress: Callable[[int, int], None] | None = None, runtime: str = "torch",
                 test_time_augmentation: bool = False, slice_gate: bool = True, organ_offsets: bool = True) -> None:
        """`runtime`: the slice encoder on a CPU, "torch" (the reference), "openvino" or "auto" (OpenVINO when
        installed and worth converting: `medclipsam.inference.openvino_encoder`). `test_time_augmentation`: text-only
        probabilities averaged over the TEST_TIME_VIEWS of each slice (about 5 times the time; prompts are not).
        `slice_gate`: drop the slices of a text-only mask that the model's slice gate (if it has one,
        `medclipsam.models.slice_gate`) calls invented. `organ_offsets`: each organ's own decision threshold for
        text-only masks, from the model's organ offsets (if it has them, `medclipsam.models.organ_offsets`)."""
        if batch_size is not None and batch_size < 1:
            raise InputError(None, f"batch size {batch_size} must be at least 1", "use e.g. 4 slices per batch")
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.runtime = check_runtime(runtime)
        self.image_path: OpenVINOImagePath | None = None  # set on the first encoding when the runtime is not torch
        self.batch_size = batch_size or default_batch_size(self.device)
        self.amp, self.cleanup, self.threshold = amp, cleanup, threshold
        self.test_time_augmentation = test_time_augmentation
        self.slice_gate, self.organ_offsets = slice_gate, organ_offsets
        self.progress = progress
        self.scan: MetaTensor | None = None
        self._volume: MetaTensor | None = None
        self._views: dict[FrameSettings, View] = {}

    @property
    def settings(self) -> FrameSettings:
        """The frame, modality and window the model was trained with."""
        return self.model.frame

    @property
    def prompt_settings(self) -> FrameSettings:
        """The frame the model answers boxes and clicks in."""
        return getattr(self.model, "prompt_frame", self.model.frame)

    def set_volume(self, scan: str | Path | MetaTensor) -> None:
        """Load (if a path) and prepare a scan: RAS and the model's frame; slices are encoded on first use."""
        self.scan = load_scan(scan) if isinstance(scan, (str, Path)) else scan
        self._volume = to_ras(self.scan)
        self.ras_affine = np.asarray(self._volume.affine, dtype=np.float64)
        self._views = {}
        self._view(self.settings)

    @property
    def frame(self) -> VolumeFrame:
        """The scan's frame for text-only segmentation."""
        return self._view(self.settings).frame

    def _view(self, settings: FrameSettings, prompted: bool = False) -> View:
        """The scan in the frame of `settings` (made once per scan, so its encodings serve text and prompts alike). A
        frame made for prompts alone runs in full precision on a CPU: there manual mode answers with the pristine
        backbone (e.g. `manual_mode="backbone"`), which users run in float32."""
        if self._volume is None:
            raise InputError(None, "no scan is set", "call predictor.set_volume(scan) first")
        if settings not in self._views:
            frame = fit_frame(self._volume, settings)
            full = prompted and self.device.type == "cpu"
            precision = amp_dtype(self.device) if self.amp and not full else None
            self._views[settings] = View(frame, self._windowed_slices(frame), precision)
        return self._views[settings]

    def _windowed_slices(self, frame: VolumeFrame) -> torch.Tensor:
        """The scan's slices in `frame`, in its settings' window (0..1)."""
        windowed = intensity_transform(frame.settings.modality, frame.settings.window)(self._volume)
        return frame.slices(windowed, pad=0.0).clamp(0.0, 1.0)

    def _autocast(self, view: View) -> contextlib.AbstractContextManager:
        if view.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=view.precision)

    def _choose_runtime(self, slices: int) -> None:
        """Settle "auto" on the first encoding: OpenVINO when worth it for `slices` (see image_path_runtime)."""
        if slices and self.image_path is None and self.runtime != "torch":
            self.image_path = image_path_runtime(self.model, self.device, self.runtime, slices=slices)
            self.runtime = "torch" if self.image_path is None else self.runtime

    def _features(self, view: View, slices: Sequence[int]) -> Any:
        """Encoded slices of a view, encoding those not cached yet in batches."""
        missing = [i for i in slices if i not in view.encoded]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            images = view.images[chunk].expand(-1, 3, -1, -1).to(self.device)
            with torch.no_grad(), self._autocast(view):
                encoded = encode_slices(self.model, images, self.image_path, view.precision)
            encoded = encoded.to("cpu", torch.float16)  # kept on the CPU at half size, used at full precision
            for row, index in enumerate(chunk):
                view.encoded[index] = select(encoded, torch.tensor([row]))
        return concatenate([view.encoded[i] for i in slices]).to(self.device, torch.float32)

    def slice_prompts(self, frame: VolumeFrame, concepts: Sequence[str], boxes: Mapping[str, Box3D],
                      points: Mapping[str, Sequence[Point3D]]) -> dict[int, SlicePrompts]:
        """Per slice of `frame`, the prompts of `concepts` there: a box prompts every slice it crosses with its
        in-plane rectangle, a point the slice nearest to it."""
        most = max([len(points.get(c, ())) for c in concepts] + [1])
        per_slice: dict[int, SlicePrompts] = {}
        top = frame.settings.size - 1
        for k, concept in enumerate(concepts):
            if concept in boxes:
                corners = frame.frame_indices(np.asarray(boxes[concept], dtype=np.float64).reshape(2, 3))
                low, high = corners.min(axis=0), corners.max(axis=0)
                rect = torch.tensor([*np.clip(low[:2], 0, top), *np.clip(high[:2], 0, top)], dtype=torch.float32)
                first = max(0, int(np.ceil(low[2] - 0.5)))
                for index in range(first, min(frame.slice_count - 1, int(np.floor(high[2] + 0.5))) + 1):
                    per_slice.setdefault(index, SlicePrompts.empty(1, len(concepts), most)).boxes[0, k] = rect
            for p, point in enumerate(points.get(concept, ())):
                column, row, depth = frame.frame_indices(np.asarray([point[:3]], dtype=np.float64))[0]
                index = int(np.clip(np.rint(depth), 0, frame.slice_count - 1))
                prompt = per_slice.setdefault(index, SlicePrompts.empty(1, len(concepts), most))
                prompt.points[0, k, p] = torch.tensor([column, row], dtype=torch.float32)
                prompt.point_labels[0, k, p] = int(point[3]) if len(point) > 3 else 1
        return per_slice

    def _probabilities(self, view: View, concepts: Sequence[str],
                       prompts: Mapping[int, SlicePrompts] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Zf, K, S, S) probabilities and (Zf, K) confidence in a view: text-only on every slice (`prompts`
        None), or prompted on the prompted slices only."""
        size, count = view.frame.settings.size, len(concepts)
        probs = torch.zeros(view.frame.slice_count, count, size, size)
        confidence = torch.full((view.frame.slice_count, count), float("nan"))
        slices = list(range(view.frame.slice_count)) if prompts is None else sorted(prompts)
        per_call = max(1, self.batch_size // count)  # (slice, concept) pairs per model call stay near batch_size
        self._choose_runtime(sum(i not in view.encoded for i in slices))
        for start in range(0, len(slices), self.batch_size):
            chunk = slices[start:start + self.batch_size]
            features = self._features(view, chunk)
            for first in range(0, len(chunk), per_call):
                part = chunk[first:first + per_call]
                batch = None if prompts is None else SlicePrompts.cat([prompts[i] for i in part])
                with torch.no_grad(), self._autocast(view):
                    p, c = self.model.segment(select(features, torch.arange(first, first + len(part))),
                                              list(concepts), batch)
                probs[part], confidence[part] = p.float().cpu(), c.float().cpu()
            if not view.keep:
                view.encoded.clear()
            if self.progress:
                self.progress(min(start + self.batch_size, len(slices)), len(slices))
        return probs, confidence

    def _text_probabilities(self, view: View, concepts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-only probabilities and confidence in `view`, averaged over the TEST_TIME_VIEWS when test-time
        augmentation is on: each moved view is encoded, segmented and resampled into `view`'s frame, and its encodings
        dropped."""
        views = TEST_TIME_VIEWS if self.test_time_augmentation else TEST_TIME_VIEWS[:1]
        report, confidences = self.progress, []
        self._choose_runtime(len(views) * sum(i not in view.encoded for i in range(view.frame.slice_count)))
        try:
            for index, (scale, shift) in enumerate(views):
                if report is not None:  # one count over all views
                    self.progress = lambda done, count, i=index: report(i * count + done, len(views) * count)
                if index == 0:
                    probs, confidence = self._probabilities(view, concepts, None)
                    covered = torch.ones(probs.shape[-2:])
                else:
                    frame = view.frame.moved(scale, shift)
                    moved = View(frame, self._windowed_slices(frame), view.precision, keep=False)
                    moved_probs, confidence = self._probabilities(moved, concepts, None)
                    resampled, inside = view.frame.resample_from(frame, moved_probs)
                    probs += resampled  # in place: no second copy of a whole scan's probabilities
                    covered += inside
                confidences.append(confidence)
        finally:
            self.progress = report
        return probs.div_(covered), torch.stack(confidences).nanmean(dim=0)

    def text_probabilities(self, concepts: Sequence[str]) -> tuple[VolumeFrame, torch.Tensor, torch.Tensor]:
        """The model's frame of the scan, and (Zf, K, S, S) text-only probabilities and (Zf, K) confidence in it,
        before the slice gate and the clean-up (for fitting and studying them)."""
        view = self._view(self.settings)
        probs, confidence = self._text_probabilities(view, list(concepts))
        return view.frame, probs, confidence

    def predict(self, concepts: Sequence[str], boxes: Mapping[str, Box3D] | None = None,
                points: Mapping[str, Sequence[Point3D]] | None = None) -> Segmentation:
        """Segment `concepts` in the scan: by name alone (text-only), or, for concepts given a box (inclusive RAS
        voxel indices, x0, y0, z0, x1, y1, z1) or points ((x, y, z[, label]) RAS voxels), by those prompts. Where a
        prompted and a text-only concept claim the same voxel, the prompted one keeps it."""
        concepts = list(concepts)
        if not concepts:
            raise InputError(None, "no concept to segment", "name at least one organ, e.g. ['liver']")
        boxes, points = dict(boxes or {}), dict(points or {})
        unknown = sorted((set(boxes) | set(points)) - set(concepts))
        if unknown:
            raise InputError(None, f"prompts given for {unknown}, which are not among the concepts {concepts}",
                             "add them to the concepts or drop their prompts")
        prompted = [c for c in concepts if c in boxes or c in points]
        text = [c for c in concepts if c not in prompted]
        labels = np.zeros(self._view(self.settings).frame.source_shape, dtype=np.uint8)
        confidence: dict[str, float] = {}
        for group, settings in ((text, self.settings), (prompted, self.prompt_settings)):
            if not group:
                continue
            view = self._view(settings, prompted=group is prompted)
            prompts = self.slice_prompts(view.frame, group, boxes, points) if group is prompted else None
            found, scores = self._labels(view, group, prompts, fill_only={c for c in group if c in points})
            for k, concept in enumerate(group, start=1):
                labels[(found == k) & ((labels == 0) | (group is prompted))] = concepts.index(concept) + 1
            confidence.update(scores)
        return Segmentation(labels, concepts, {c: confidence[c] for c in concepts}, self.ras_affine, self.scan)

    def refine(self, previous: Segmentation, concept: str, box: Box3D | None = None,
               points: Sequence[Point3D] = ()) -> Segmentation:
        """`previous` with one concept re-segmented, reusing the cached slice encodings; its other concepts are left
        voxel for voxel. A box replaces the concept everywhere; clicks alone replace it only on the axial (RAS z)
        slices they prompt, and keep it as it was elsewhere."""
        if concept not in previous.concepts:
            raise InputError(None, f"{concept!r} is not in this segmentation ({previous.concepts})",
                             "refine one of its concepts, or predict it first")
        if box is None and not points:
            raise InputError(None, f"refining {concept!r} needs a box or a point", "give box= or points=")
        single = self.predict([concept], boxes={concept: box} if box is not None else None,
                              points={concept: list(points)} if points else None)
        value = previous.concepts.index(concept) + 1
        redone = np.ones(previous.labels.shape[2], dtype=bool)
        if box is None:  # clicked slices, and those a model frame with thicker slices reached from them
            redone[:] = single.labels.any(axis=(0, 1))
            redone[[int(np.clip(round(p[2]), 0, redone.size - 1)) for p in points]] = True
        labels = previous.labels.copy()
        labels[:, :, redone] = np.where(labels[:, :, redone] == value, 0, labels[:, :, redone])
        labels[(single.labels == 1) & (labels == 0) & redone[None, None, :]] = value
        confidence = {**previous.confidence, concept: single.confidence[concept]}
        return Segmentation(labels, list(previous.concepts), confidence, previous.affine, previous.scan)

    def _labels(self, view: View, concepts: list[str], prompts: Mapping[int, SlicePrompts] | None,
                fill_only: set[str]) -> tuple[np.ndarray, dict[str, float]]:
        """Labels 1..K of `concepts` on the scan's grid from one view (cleaned up), and their confidence."""
        if prompts is None:
            probs, confidence = self._text_probabilities(view, concepts)
            gate = getattr(self.model, "slice_gate", None) if self.slice_gate else None
            if gate is not None:
                gate.apply(probs, confidence, concepts, view.frame.slice_mm, view.frame.settings.pixel_mm,
                           self.threshold)
            offsets = getattr(self.model, "organ_offsets", None) if self.organ_offsets else None
            if offsets is not None:
                offsets.apply(probs, concepts)
        else:
            probs, confidence = self._probabilities(view, concepts, prompts)
        labels = view.frame.labels_to_source(probs, self.threshold)
        if self.cleanup:
            labels = clean_label_map(labels, {k + 1: c for k, c in enumerate(concepts)},
                                     fill_only={k + 1 for k, c in enumerate(concepts) if c in fill_only})
        found = (probs > self.threshold).flatten(2).any(dim=2)  # (Zf, K): slices where each concept was found
        scores = {}
        for k, concept in enumerate(concepts):
            values = confidence[found[:, k], k]
            values = values[~torch.isnan(values)]
            scores[concept] = float(values.mean()) if len(values) and (labels == k + 1).any() else float("nan")
        return labels, scores
