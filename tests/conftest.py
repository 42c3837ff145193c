"""Shared test settings: offline hub, deterministic torch, a cache (converted OpenVINO encoders) of the session's own,
so tests neither read nor fill the user's, and, under pytest-xdist (`-n 2`), the cores shared among the workers and
the heaviest modules handed out first, so that no worker is left with one long module at the end."""
import locale
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MEDCLIPSAM_CACHE", tempfile.mkdtemp(prefix="medclipsam-test-cache-"))
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # set before torch loads, so that subprocesses (CLI runs, gloo ranks) inherit it too
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# modules that take a minute or more on 2 cores (measured with --durations), run first
HEAVY_MODULES = ("test_real_ct", "test_text_only_training", "test_default_model", "test_faults", "test_notebooks",
                 "test_segment_cli", "test_openvino_encoder", "test_baseline_sam", "test_presence")
SESSION_LOCALE = locale.setlocale(locale.LC_ALL)
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
def _keep_the_locale():
    """Some libraries (GDCM's writer, matplotlib) leave the process in the "C" locale, which makes every later text read
    ASCII; each test starts and ends in the session's locale, even after a module fixture changed it."""
    locale.setlocale(locale.LC_ALL, SESSION_LOCALE)
    yield
    locale.setlocale(locale.LC_ALL, SESSION_LOCALE)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list) -> None:
    """Heavy modules first (in HEAVY_MODULES' order), the rest as collected; the order is the same in every worker."""
    def rank(item) -> int:
        name = item.path.stem
        return HEAVY_MODULES.index(name) if name in HEAVY_MODULES else len(HEAVY_MODULES)
    items.sort(key=rank)
