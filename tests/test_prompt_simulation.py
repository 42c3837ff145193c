"""Simulated prompts: boxes surround the mask within the jitter, clicks fall inside it, absent concepts stay text-only."""
import pytest
import torch

from medclipsam.training.prompt_simulation import choose_modes, jittered_box, positive_points, simulate_prompts


@pytest.fixture
def mask():
    m = torch.zeros(64, 64)
    m[10:30, 20:50] = 1
    return m


def test_box_without_jitter_is_tight(mask):
    box = jittered_box(mask, torch.Generator().manual_seed(0), jitter=0.0)
    assert box.tolist() == [20.0, 10.0, 49.0, 29.0]


def test_jittered_box_moves_by_at_most_the_jitter(mask):
    gen = torch.Generator().manual_seed(1)
    boxes = torch.stack([jittered_box(mask, gen, jitter=0.1) for _ in range(50)])
    tight = torch.tensor([20.0, 10.0, 49.0, 29.0])
    limit = torch.tensor([3.0, 2.0, 3.0, 2.0])  # 10 % of width 30 / height 20
    assert ((boxes - tight).abs() <= limit + 1e-5).all()
    assert (boxes != tight).any()


def test_points_fall_inside_the_mask(mask):
    points = positive_points(mask, 200, torch.Generator().manual_seed(2)).long()
    assert mask[points[:, 1], points[:, 0]].all()


def test_modes_keep_absent_concepts_text_only():
    gen = torch.Generator().manual_seed(3)
    modes = choose_modes("mixed", [True] * 60 + [False] * 5, gen)
    assert modes[60:] == ["text"] * 5
    assert set(modes[:60]) == {"text", "box", "points"}
    assert choose_modes("box", [True, False], gen) == ["box", "text"]
    with pytest.raises(ValueError, match="mixed"):
        choose_modes("boxes", [True], gen)


def test_simulate_prompts_shapes(mask):
    gen = torch.Generator().manual_seed(4)
    masks = torch.stack([mask, mask])
    assert simulate_prompts(masks, ["text", "text"], gen).empty
    assert simulate_prompts(masks, ["box", "box"], gen).boxes.shape == (2, 4)
    clicks = simulate_prompts(masks, ["points", "points"], gen, n_points=5)
    assert clicks.points.shape == (2, 5, 2) and (clicks.point_labels == 1).all()
    with pytest.raises(ValueError, match="one mode"):
        simulate_prompts(masks, ["box", "text"], gen)
