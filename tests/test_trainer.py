"""The trainer learns on a phantom slice from cached trunk features (text-only, prompt-consistent)."""
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import load_case, slice_items
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.training.trainer import TrainConfig, Trainer, parameter_groups


def test_text_only_training_reduces_loss_on_a_phantom_slice(tmp_path):
    make_phantom(1).to_nifti(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")
    case = load_case({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    items = slice_items(case, load_card("phantom"), empty_ratio=0, absent_per_slice=1, slice_step=6)
    item = max((i for i in items if not all(i["present"])), key=lambda i: len(i["concepts"]))
    keep = [0, len(item["concepts"]) - 1]  # the first present organ and the sampled absent one
    item = {**item, "masks": item["masks"][keep], "concepts": [item["concepts"][k] for k in keep],
            "present": [item["present"][k] for k in keep]}
    assert item["present"] == [True, False]
    torch.manual_seed(0)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last1"))
    config = TrainConfig(steps=15, slices_per_step=1, mode="text", seed=0)
    assert len(parameter_groups(model, config)) == 3
    history = Trainer(model, [item], config).fit()
    first = sum(h["total"] for h in history[:3]) / 3
    last = sum(h["total"] for h in history[-3:]) / 3
    assert last < 0.7 * first
