"""CT windows and MRI percentile normalisation: known values, geometry kept, clear errors."""
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medclipsam.data.intensity import (
    CT_WINDOWS,
    CTWindow,
    CTWindowd,
    MRIPercentileNormalize,
    MRIPercentileNormalized,
    intensity_transform,
)

AFFINE = np.array([[-0.8, 0.0, 0.0, 12.0], [0.0, -0.8, 0.0, -5.0], [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]])


def hu_volume(values) -> MetaTensor:
    """A (1, N, 1, 1) MetaTensor holding the given HU values, with a non-trivial affine."""
    data = torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1)
    return MetaTensor(data, affine=torch.tensor(AFFINE))


def test_abdomen_window_maps_known_hu_values_and_keeps_affine():
    out = CTWindow("abdomen")(hu_volume([-1000, -160, 40, 140, 240, 3000]))
    assert isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(out.affine.numpy(), AFFINE)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("preset", sorted(CT_WINDOWS))
def test_every_preset_puts_level_at_half_and_edges_at_zero_and_one(preset):
    width, level = CT_WINDOWS[preset]
    out = CTWindow(preset)(hu_volume([level - width, level - width / 2, level, level + width / 2, level + width]))
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_presets_have_the_standard_width_and_level():
    assert CT_WINDOWS["abdomen"] == (400, 40)
    assert CT_WINDOWS["liver"] == (150, 30)
    assert CT_WINDOWS["lung"] == (1500, -600)
    assert CT_WINDOWS["bone"] == (1800, 400)
    assert CT_WINDOWS["brain"] == (80, 40)
    assert CT_WINDOWS["soft_tissue"] == (350, 50)


def test_explicit_width_and_level_override_the_preset():
    out = CTWindow(None, width=100, level=0)(hu_volume([-50, 0, 25, 50]))
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 0.5, 0.75, 1.0], atol=1e-6)
    partial = CTWindow("abdomen", level=0)(hu_volume([-200, 0, 200]))  # abdomen width 400, level replaced
    np.testing.assert_allclose(partial.flatten().numpy(), [0.0, 0.5, 1.0], atol=1e-6)


def test_preset_name_with_space_is_accepted():
    out = CTWindow("Soft tissue")(hu_volume([50]))
    assert out.item() == pytest.approx(0.5)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as info:
        CTWindow("kidney")
    for name in CT_WINDOWS:
        assert name in str(info.value)
    assert "kidney" in str(info.value)
    with pytest.raises(ValueError, match="known presets"):
        CTWindowd(keys="image", preset="kidney")


def test_no_preset_and_no_width_is_an_error():
    with pytest.raises(ValueError, match="width and level"):
        CTWindow(None, width=100)


def test_dictionary_form_changes_only_its_keys_and_keeps_affine():
    label = MetaTensor(torch.ones(1, 3, 1, 1), affine=torch.tensor(AFFINE))
    out = CTWindowd(keys="image", preset="lung")({"image": hu_volume([-1350, -600, 150]), "label": label})
    np.testing.assert_allclose(out["image"].flatten().numpy(), [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_array_equal(out["image"].affine.numpy(), AFFINE)
    assert torch.equal(out["label"].as_tensor(), torch.ones(1, 3, 1, 1))


def mri_volume() -> MetaTensor:
    values = np.arange(1000, dtype=np.float32)
    values[0], values[-1] = -5000.0, 50000.0  # outliers beyond the 0.5 / 99.5 percentiles
    return MetaTensor(torch.from_numpy(values).reshape(1, 10, 10, 10), affine=torch.tensor(AFFINE))


def test_mri_percentile_normalisation_clips_outliers_and_keeps_affine():
    volume = mri_volume()
    out = MRIPercentileNormalize()(volume)
    flat = out.flatten().numpy()
    low, high = np.percentile(volume.numpy(), [0.5, 99.5])
    assert flat.min() == pytest.approx(0.0) and flat.max() == pytest.approx(1.0)
    assert flat[0] == pytest.approx(0.0) and flat[-1] == pytest.approx(1.0)  # outliers clipped
    assert flat[500] == pytest.approx((500 - low) / (high - low), abs=1e-5)
    np.testing.assert_array_equal(out.affine.numpy(), AFFINE)


def test_mri_dictionary_form_matches_array_form():
    out = MRIPercentileNormalized(keys="image", lower=1, upper=99)({"image": mri_volume()})
    expected = MRIPercentileNormalize(lower=1, upper=99)(mri_volume())
    assert torch.allclose(out["image"].as_tensor(), expected.as_tensor())
    np.testing.assert_array_equal(out["image"].affine.numpy(), AFFINE)


def test_intensity_transform_picks_by_modality():
    lung = intensity_transform("CT", "lung")(hu_volume([-600]))
    assert lung.item() == pytest.approx(0.5)
    assert isinstance(intensity_transform("ct"), CTWindow)
    assert isinstance(intensity_transform("MR"), MRIPercentileNormalize)
    assert isinstance(intensity_transform("MRI"), MRIPercentileNormalize)
    with pytest.raises(ValueError, match="PET"):
        intensity_transform("PET")
