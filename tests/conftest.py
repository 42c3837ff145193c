"""Shared test settings: offline hub, deterministic torch, small thread count for 2-core machines, and a cache
(converted OpenVINO encoders) of the session's own, so tests neither read nor fill the user's."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MEDCLIPSAM_CACHE", tempfile.mkdtemp(prefix="medclipsam-test-cache-"))

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = "medclipsam-test-tiny-vit"
TINY_TIMM = "medclipsam-test-tiny-timm"
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


@pytest.fixture(scope="session")
def tiny_open_clip_configs(tmp_path_factory):
    """Register two tiny open_clip model configs (a native ViT tower and a timm one); returns their names."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_configs")
    configs = {
        TINY: {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        TINY_TIMM: {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                    "timm_proj": "linear", "image_size": 160},
    }
    for name, vision in configs.items():
        (folder / f"{name}.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision, "text_cfg": TEXT_CFG}))
        open_clip.add_model_config(folder / f"{name}.json")
    return TINY, TINY_TIMM


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
