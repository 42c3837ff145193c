"""SAM 3 wrapper: it refuses clearly when the `sam3` package or its checkpoint is missing (never a fake), and its
adapter turns SAM 3's per-instance results into per-concept probabilities.

The adapter tests inject `StandInProcessor`, a test double for the external `sam3` API (`Sam3Processor`'s
`set_image`, `reset_all_prompts`, `set_text_prompt`, `add_geometric_prompt`): it records every call and answers with
instances we choose, so that what the wrapper sends and how it merges the answers can be checked without SAM 3.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from medclipsam.errors import InputError, WeightsError
from medclipsam.methods import sam3 as sam3_module
from medclipsam.methods.sam3 import box_to_sam3, merged_probability
from medclipsam.models.factory import build_method
from medclipsam.models.prompts import SlicePrompts
from medclipsam.training.loop import TrainBudget


class StandInProcessor:
    """Test double for `sam3.model.sam3_image_processor.Sam3Processor`: `instances[prompt]` is the list of
    (probability map, box) it "finds" for a text prompt."""

    def __init__(self, instances: dict[str, list[tuple[torch.Tensor, list[float]]]]) -> None:
        self.instances = instances
        self.calls: list[tuple] = []

    def set_image(self, image: Image.Image, state: dict | None = None) -> dict:
        self.calls.append(("set_image", image.size, image.mode))
        return {"image": image}

    def reset_all_prompts(self, state: dict) -> None:
        self.calls.append(("reset",))
        state.pop("prompt", None)

    def set_text_prompt(self, prompt: str, state: dict) -> dict:
        self.calls.append(("text", prompt))
        found = self.instances.get(prompt, [])
        state["prompt"] = prompt
        state["masks_logits"] = torch.stack([p for p, _ in found])[:, None] if found else torch.zeros(0, 1, 8, 8)
        state["boxes"] = torch.tensor([b for _, b in found]).reshape(-1, 4)
        return state

    def add_geometric_prompt(self, box: list[float], label: bool, state: dict) -> dict:
        self.calls.append(("box", [round(v, 4) for v in box], label, state.get("prompt")))
        return state


def blob(y0: int, y1: int, x0: int, x1: int, value: float) -> torch.Tensor:
    prob = torch.zeros(8, 8)
    prob[y0:y1, x0:x1] = value
    return prob


def test_missing_package_or_checkpoint_is_a_clear_error_not_a_fake(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sam3_module, "sam3_available", lambda: False)
    with pytest.raises(WeightsError, match=r"sam3 package is not installed.*pip install git\+https://github.com/"
                                           r"facebookresearch/sam3.*sam3\.pt"):
        build_method("sam3", ["liver"], checkpoint=str(tmp_path / "sam3.pt"))
    monkeypatch.setattr(sam3_module, "sam3_available", lambda: True)
    with pytest.raises(WeightsError, match="no checkpoint given. Pass checkpoint="):
        build_method("sam3", ["liver"])
    with pytest.raises(WeightsError, match="sam3.pt: file not found"):
        build_method("sam3", ["liver"], checkpoint=str(tmp_path / "sam3.pt"))


def test_this_machine_reports_sam3_unavailable_when_the_package_is_absent() -> None:
    if sam3_module.sam3_available():
        pytest.skip("the sam3 package is installed here")
    with pytest.raises(WeightsError, match="not installed"):
        build_method("sam3", ["liver"], checkpoint="sam3.pt")


def test_text_setting_sends_each_concept_name_and_merges_instances_by_maximum() -> None:
    processor = StandInProcessor({
        "liver": [(blob(0, 4, 0, 4, 0.9), [0, 0, 3, 3]), (blob(2, 6, 2, 6, 0.6), [2, 2, 5, 5])],
        "spleen": [],
    })
    method = build_method("sam3", ["liver", "spleen"], processor=processor, image_size=8)
    assert method.trainable_parameters() == 0 and method.fit([], [], TrainBudget()) == []
    images = torch.rand(2, 3, 8, 8)
    probs = method.predict(images, ["liver", "spleen"])
    expected = torch.maximum(blob(0, 4, 0, 4, 0.9), blob(2, 6, 2, 6, 0.6))
    assert torch.equal(probs[0, 0], expected) and torch.equal(probs[1, 0], expected)
    assert not probs[:, 1].any()  # SAM 3 found no spleen: an empty map, nothing invented
    assert processor.calls[:4] == [("set_image", (8, 8), "RGB"), ("reset",), ("text", "liver"), ("reset",)]
    assert [c for c in processor.calls if c[0] == "text"] == [("text", "liver"), ("text", "spleen")] * 2


def test_manual_setting_adds_the_box_and_keeps_the_instance_it_overlaps_best() -> None:
    processor = StandInProcessor({
        "left kidney": [(blob(0, 3, 0, 3, 0.8), [0, 0, 2, 2]), (blob(4, 8, 4, 8, 0.7), [4, 4, 7, 7])],
    })
    method = build_method("sam3", ["left kidney", "liver"], processor=processor, image_size=8)
    boxes = torch.zeros(1, 2, 4)
    boxes[0, 0] = torch.tensor([4.0, 5.0, 7.0, 7.0])  # x0, y0, x1, y1 pixels; the liver gets no box
    probs = method.predict(torch.rand(1, 3, 8, 8), ["left kidney", "liver"], boxes)
    assert torch.equal(probs[0, 0], blob(4, 8, 4, 8, 0.7)) and not probs[0, 1].any()
    # (cx, cy, w, h) normalised by the image size, sent after the text prompt of the same concept
    assert ("box", [0.75, 0.8125, 0.5, 0.375], True, "left kidney") in processor.calls
    assert ("text", "liver") not in processor.calls  # an all-zero box: not prompted
    assert box_to_sam3(torch.tensor([0.0, 0.0, 7.0, 7.0]), (8, 8)) == [0.5, 0.5, 1.0, 1.0]
    no_overlap = {"masks_logits": torch.ones(1, 1, 8, 8), "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}
    assert not merged_probability(no_overlap, (8, 8), torch.tensor([5.0, 5.0, 7.0, 7.0])).any()


def test_predictor_prompts_reach_sam3_as_boxes_and_clicks_are_refused() -> None:
    processor = StandInProcessor({"liver": [(blob(0, 4, 0, 4, 0.9), [0, 0, 3, 3])]})
    method = build_method("sam3", ["liver", "spleen"], processor=processor, image_size=8)
    prompts = SlicePrompts.empty(1, 2)
    prompts.boxes[0, 0] = torch.tensor([0.0, 0.0, 3.0, 3.0])  # the spleen keeps its NaN box: not prompted
    probs, confidence = method.segment(method.encode(torch.rand(1, 3, 8, 8)), ["liver", "spleen"], prompts)
    assert torch.equal(probs[0, 0], blob(0, 4, 0, 4, 0.9)) and not probs[0, 1].any()
    assert bool(confidence.isnan().all())  # SAM 3's wrapper has no IoU head
    assert [c for c in processor.calls if c[0] == "text"] == [("text", "liver")]
    prompts.point_labels[0, 1, 0] = 1
    with pytest.raises(InputError, match="takes boxes, not points"):
        method.segment(torch.rand(1, 3, 8, 8), ["liver", "spleen"], prompts)
