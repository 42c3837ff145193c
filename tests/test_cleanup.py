"""3D clean-up: isolated slices dropped, largest component kept for single-piece anatomy, holes filled."""
import numpy as np

from medclipsam.inference.cleanup import clean_label_map, clean_mask, is_single_piece


def _organ() -> np.ndarray:
    mask = np.zeros((20, 20, 10), dtype=bool)
    mask[4:12, 4:12, 2:7] = True
    return mask


def test_distant_speck_and_isolated_slice_are_removed_and_holes_filled():
    truth = _organ()
    noisy = truth.copy()
    noisy[16:18, 16:18, 3:5] = True  # a second, smaller blob on neighbouring slices
    noisy[2, 2, 9] = True  # an isolated slice
    noisy[7:9, 7:9, 4] = False  # a hole inside the organ
    cleaned = clean_mask(noisy)
    assert np.array_equal(cleaned, truth)
    assert noisy[2, 2, 9] and not noisy[7, 7, 4]  # the input is not changed


def test_multi_part_anatomy_keeps_every_component():
    mask = _organ()
    mask[15:18, 15:18, 2:7] = True
    assert not is_single_piece("liver tumour") and is_single_piece("left kidney")
    assert clean_mask(mask, single_component=False).sum() == mask.sum()
    assert clean_mask(mask, single_component=True).sum() == _organ().sum()


def test_label_map_clean_up_never_moves_voxels_between_concepts():
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[_organ()] = 1
    labels[7:9, 7:9, 4] = 2  # another concept inside organ 1's hole
    labels[7:9, 7:9, 5] = 0  # a real hole
    cleaned = clean_label_map(labels, {1: "liver", 2: "aorta"})
    assert (cleaned[7:9, 7:9, 4] == 2).all()
    assert (cleaned[7:9, 7:9, 5] == 1).all()


def test_label_map_clean_up_in_each_organs_box_equals_the_whole_grid():
    rng = np.random.default_rng(0)
    for trial in range(6):
        noise = rng.random((30, 26, 14))
        labels = np.zeros(noise.shape, dtype=np.uint8)
        labels[noise > 0.8] = 1  # specks everywhere, touching every border
        labels[3:20, 5:18, 2:11] = 2  # an organ with holes and a ragged edge
        labels[8:12, 9:13, 4:8][noise[8:12, 9:13, 4:8] > 0.5] = 0
        labels[22:28, 1:6, trial:trial + 3] = 3
        names = {1: "liver", 2: "spleen", 3: "lesion"}
        expected = np.zeros_like(labels)
        for value, name in names.items():
            mask = clean_mask(labels == value, single_component=is_single_piece(name))
            expected[mask & ((labels == value) | (labels == 0))] = value
        assert np.array_equal(clean_label_map(labels, names), expected)
