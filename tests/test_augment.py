"""Few-label augmentation: seeded views whose masks follow their images, never mirrored left-right."""
import torch

from medclipsam.data.augment import AugmentSettings, augment_items


def item() -> dict:
    """A slice with a bright 'organ' on the image's left (the patient's right) and its mask."""
    image = torch.full((1, 64, 64), 0.2)
    image[0, 20:40, 8:24] = 0.9
    masks = torch.zeros(2, 64, 64)
    masks[0, 20:40, 8:24] = 1.0
    return {"image": image.expand(3, -1, -1), "masks": masks, "concepts": ["right kidney", "spleen"],
            "present": [True, False], "case_id": "toy", "slice_index": 3}


def test_views_are_seeded_and_masks_follow_their_image():
    settings = AugmentSettings(views=4, noise_sd=0.0, blur_probability=0.0, contrast=0.0, brightness=0.0)
    original = item()
    items = augment_items([original], settings, seed=7)
    again = augment_items([item()], settings, seed=7)
    other = augment_items([item()], settings, seed=8)
    assert len(items) == 4 and items[0] is original  # the original first, then its views
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(items, again))
    assert not torch.equal(items[1]["image"], other[1]["image"])
    for view in items[1:]:
        assert type(view["image"]) is torch.Tensor and view["image"].shape == (3, 64, 64)
        bright = view["image"][0] > 0.55
        organ = view["masks"][0] > 0.5
        assert (bright & organ).sum() >= 0.8 * organ.sum() and (bright & ~organ).sum() <= 0.2 * organ.sum()
        assert organ.nonzero()[:, 1].float().mean() < 32  # still on the image's left: no left-right flip
        assert view["present"] == [True, False] and view["masks"][1].sum() == 0


def test_intensity_changes_stay_in_range_and_one_view_is_no_augmentation():
    views = augment_items([item()], AugmentSettings(views=3, contrast=0.5, brightness=0.3, noise_sd=0.1), seed=0)
    assert all(0.0 <= float(v["image"].min()) and float(v["image"].max()) <= 1.0 for v in views)
    assert augment_items([item()], AugmentSettings(views=1), seed=0)[0]["image"].equal(item()["image"])
