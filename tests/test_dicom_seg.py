"""DICOM SEG: a synthetic oblique CT series written here, its mask made as medclipsam does (load_scan, save_mask),
the SEG read back: it references the series, carries the card's SNOMED CT codes, and equals the mask voxel for
voxel; series a voxel grid cannot hold (tilt, missing slice, multi-frame, non-parallel) and NIfTI input are refused."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medclipsam.data.concepts import load_card
from medclipsam.data.io import load_scan, save_mask
from medclipsam.errors import InputError, OutputExistsError
from medclipsam.inference.dicom_seg import Algorithm, write_dicom_seg

ROWS, COLUMNS, SLICES = 32, 40, 6
PIXEL_SPACING = (0.8, 0.7)  # between rows, between columns (mm)
SLICE_GAP = 2.5
ALGORITHM = Algorithm(name="CLIP-Guided SAM", version="0.1.0", model="default-tiny")
CONCEPTS = {"liver": 1, "right kidney": 3, "left kidney": 4, "pancreas": 7}  # phantom card ids; pancreas empty


def orientation() -> tuple[np.ndarray, np.ndarray]:
    """Oblique row and column direction cosines (LPS): an axial plane turned 20 degrees and tipped 10 degrees."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    around_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    around_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = around_z @ around_x
    return rotation[:, 0], rotation[:, 1]


def hounsfield(k: int) -> np.ndarray:
    """Slice k's HU values: a pattern that differs along rows, columns and slices (so any flip shows)."""
    m, n = np.meshgrid(np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    return (((n * 7 + m * 13 + k * 29) % 200) - 100).astype(np.int16)


def organ_of(hu: np.ndarray) -> np.ndarray:
    """The label map as a function of intensity: liver 1, right kidney 3, left kidney 4, pancreas (7) nowhere."""
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[(hu >= -100) & (hu < -40)] = 1
    labels[(hu >= 20) & (hu < 35)] = 3
    labels[hu >= 90] = 4
    return labels


def write_series(folder: Path, *, tilt_mm: float = 0.0, skip: int | None = None, frames: int = 1,
                 turn_slice: int | None = None, decimals: int = 6) -> list[pydicom.Dataset]:
    """One CT file per slice as a scanner writes it (shuffled file names, positions with `decimals` decimals);
    options make the broken variants."""
    folder.mkdir(parents=True)
    row_dir, column_dir = orientation()
    normal = np.cross(row_dir, column_dir)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    written = []
    for k in range(SLICES):
        if k == skip:
            continue
        position = np.array([-60.0, 25.0, 110.0]) + k * (SLICE_GAP * normal + tilt_mm * column_dir)
        cosines = (*row_dir, *column_dir)
        if k == turn_slice:
            cosines = (*orientation()[1], *(-orientation()[0]))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20250101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "CT", series, 3, k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.ImagePositionPatient = [f"{v:.{decimals}f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in cosines]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_GAP
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        pixels = np.stack([hounsfield(k)] * frames) if frames > 1 else hounsfield(k)
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{(k * 7919) % 97:04d}", enforce_file_format=True)
        written.append(ds)
    return written


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict:
    """The series, its mask written by medclipsam's own reader and writer, and the SEG written from it."""
    root = tmp_path_factory.mktemp("dicom_seg")
    instances = write_series(root / "series")
    scan = load_scan(root / "series")
    mask_path = save_mask(organ_of(scan[0].numpy().astype(np.int16)), like=scan, path=root / "out" / "mask.nii.gz")
    written = write_dicom_seg(mask_path, root / "series", CONCEPTS, "phantom", root / "out" / "seg.dcm", ALGORITHM)
    return {"root": root, "instances": instances, "scan": scan, "mask": mask_path, "written": written,
            "seg": pydicom.dcmread(written.path)}


def test_seg_references_the_series(series) -> None:
    seg, instances = series["seg"], series["instances"]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == instances[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == instances[0].StudyInstanceUID and seg.PatientID == "PHANTOM"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == instances[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == \
        {ds.SOPInstanceUID for ds in instances}
    assert seg.SeriesInstanceUID != instances[0].SeriesInstanceUID and seg.SeriesNumber == 1003


def test_segments_carry_the_cards_snomed_codes(series) -> None:
    seg, written = series["seg"], series["written"]
    assert written.segments == {"liver": 1, "right kidney": 2, "left kidney": 3}
    assert written.omitted == ("pancreas",)
    card = load_card("phantom")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "right kidney", "left kidney"]
    for segment in seg.SegmentSequence:
        coding = card.resolve(segment.SegmentLabel).coding
        category, kind = segment.SegmentedPropertyCategoryCodeSequence[0], segment.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == \
            ("91723000", "SCT", "Anatomical Structure")
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == \
            (coding.type.value, "SCT", coding.type.meaning)
        assert kind.CodingSchemeVersion == card.coding_scheme.version
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and algorithm.AlgorithmName == ALGORITHM.name
        assert algorithm.AlgorithmVersion == ALGORITHM.version and ALGORITHM.model in algorithm.AlgorithmParameters
    sides = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence}
    assert sides["liver"].get("SegmentedPropertyTypeModifierCodeSequence") is None
    assert sides["right kidney"].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert sides["left kidney"].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"


def _frames_by_source(seg: pydicom.Dataset) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(source SOP instance UID, segment number) -> (frame pixels, the frame's ImagePositionPatient)."""
    pixels = seg.pixel_array.reshape(-1, ROWS, COLUMNS)
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = {}
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        frames[(source, number)] = (pixels[f], np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float))
    return frames


def test_each_segment_equals_the_nifti_mask_voxel_for_voxel(series) -> None:
    seg, instances, written = series["seg"], series["instances"], series["written"]
    mask_image = nib.load(series["mask"])
    mask = np.asarray(mask_image.dataobj)
    to_voxel = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ mask_image.affine)  # LPS mm -> NIfTI index
    row_dir, column_dir = orientation()
    m, n = np.meshgrid(np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    frames = _frames_by_source(seg)
    position_of = {ds.SOPInstanceUID: np.asarray(ds.ImagePositionPatient, float) for ds in instances}
    for ds in instances:
        for name, number in written.segments.items():
            pixels, position = frames.get((ds.SOPInstanceUID, number), (np.zeros((ROWS, COLUMNS)), None))
            if position is not None:
                np.testing.assert_allclose(position, position_of[ds.SOPInstanceUID], atol=1e-4)
            world = (position_of[ds.SOPInstanceUID] + n[..., None] * PIXEL_SPACING[1] * row_dir
                     + m[..., None] * PIXEL_SPACING[0] * column_dir)
            index = np.rint(world @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
            expected = mask[index[..., 0], index[..., 1], index[..., 2]] == CONCEPTS[name]
            np.testing.assert_array_equal(pixels.astype(bool), expected, err_msg=f"{name} in {ds.InstanceNumber}")
            by_intensity = organ_of(hounsfield(int(ds.InstanceNumber) - 1)) == CONCEPTS[name]
            np.testing.assert_array_equal(pixels.astype(bool), by_intensity)
    total = sum(frame.sum() for frame, _ in frames.values())
    assert total == sum(int((mask == CONCEPTS[name]).sum()) for name in written.segments)


def test_array_input_gives_the_same_segments(series, tmp_path) -> None:
    labels = np.asarray(nib.load(series["mask"]).dataobj)
    written = write_dicom_seg(labels, series["root"] / "series", {"liver": 1}, load_card("phantom"),
                              tmp_path / "seg.dcm", ALGORITHM)
    again = _frames_by_source(pydicom.dcmread(written.path))
    first = _frames_by_source(series["seg"])
    assert again.keys() == {key for key in first if key[1] == 1}
    for key, (pixels, _) in again.items():
        np.testing.assert_array_equal(pixels, first[key][0])


def test_positions_rounded_by_the_scanner_still_map_slice_for_slice(tmp_path) -> None:
    instances = write_series(tmp_path / "series", decimals=1)
    scan = load_scan(tmp_path / "series")
    mask = save_mask(organ_of(scan[0].numpy().astype(np.int16)), like=scan, path=tmp_path / "mask.nii.gz")
    written = write_dicom_seg(mask, tmp_path / "series", CONCEPTS, "phantom", tmp_path / "out" / "seg.dcm", ALGORITHM)
    frames = _frames_by_source(pydicom.dcmread(written.path))
    for ds in instances:
        for name, number in written.segments.items():
            pixels = frames.get((ds.SOPInstanceUID, number), (np.zeros((ROWS, COLUMNS)),))[0]
            expected = organ_of(hounsfield(int(ds.InstanceNumber) - 1)) == CONCEPTS[name]
            np.testing.assert_array_equal(pixels.astype(bool), expected)


def test_lesion_segments_carry_their_anatomic_region(series, tmp_path) -> None:
    written = write_dicom_seg(series["mask"], series["root"] / "series", {"liver": 1, "liver tumour": 3},
                              "msd_liver", tmp_path / "seg.dcm", ALGORITHM)
    tumour = pydicom.dcmread(written.path).SegmentSequence[1]
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"


@pytest.mark.parametrize("variant, message", [
    ({"tilt_mm": 0.9}, "gantry-tilted"),
    ({"skip": 3}, "not evenly spaced"),
    ({"frames": 2}, "multi-frame"),
    ({"turn_slice": 2}, "not parallel"),
])
def test_series_a_grid_cannot_hold_are_refused(series, tmp_path, variant, message) -> None:
    write_series(tmp_path / "series", **variant)
    labels = np.zeros((COLUMNS, ROWS, SLICES), dtype=np.uint8)
    with pytest.raises(InputError, match=message):
        write_dicom_seg(labels, tmp_path / "series", CONCEPTS, "phantom", tmp_path / "seg.dcm", ALGORITHM)
    assert not (tmp_path / "seg.dcm").exists()


def test_nifti_input_asks_for_the_series_folder(series, tmp_path) -> None:
    with pytest.raises(InputError, match="DICOM SEG needs a DICOM series: pass the series folder"):
        write_dicom_seg(series["mask"], series["mask"], CONCEPTS, "phantom", tmp_path / "seg.dcm", ALGORITHM)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no DICOM files"):
        write_dicom_seg(series["mask"], empty, CONCEPTS, "phantom", tmp_path / "seg.dcm", ALGORITHM)


def test_mask_off_the_series_grid_is_refused(series, tmp_path) -> None:
    other = tmp_path / "other.nii.gz"
    image = nib.load(series["mask"])
    shifted = image.affine.copy()
    shifted[:3, 3] += 0.4 * image.affine[:3, 0]
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), other)
    with pytest.raises(InputError, match="not on this series' voxel grid"):
        write_dicom_seg(other, series["root"] / "series", CONCEPTS, "phantom", tmp_path / "seg.dcm", ALGORITHM)


def test_outputs_never_overwrite_inputs(series, tmp_path) -> None:
    folder = series["root"] / "series"
    with pytest.raises(OutputExistsError, match="inside the source series folder"):
        write_dicom_seg(series["mask"], folder, CONCEPTS, "phantom", folder / "seg.dcm", ALGORITHM)
    with pytest.raises(OutputExistsError, match="input label map"):
        write_dicom_seg(series["mask"], folder, CONCEPTS, "phantom", series["mask"], ALGORITHM)
    with pytest.raises(OutputExistsError, match="already exists"):
        write_dicom_seg(series["mask"], folder, CONCEPTS, "phantom", series["written"].path, ALGORITHM)
    before = series["written"].path.read_bytes()
    write_dicom_seg(series["mask"], folder, CONCEPTS, "phantom", series["written"].path, ALGORITHM, overwrite=True)
    assert series["written"].path.read_bytes() != before
    assert sorted(p.name for p in series["written"].path.parent.iterdir()) == ["mask.nii.gz", "seg.dcm"]


def test_nothing_found_writes_no_seg(series, tmp_path) -> None:
    with pytest.raises(InputError, match="no organ has a voxel"):
        write_dicom_seg(series["mask"], series["root"] / "series", {"pancreas": 7}, "phantom",
                        tmp_path / "seg.dcm", ALGORITHM)
    assert not (tmp_path / "seg.dcm").exists()


def test_concept_without_code_names_card_and_label(series, tmp_path) -> None:
    card = tmp_path / "uncoded.yaml"
    card.write_text("name: uncoded\ntitle: t\nsource: s\nlicence: l\nmodality: CT\nlabels:\n  1: {name: liver}\n")
    with pytest.raises(InputError, match=r"uncoded.*'liver' \(label 1\) has no SNOMED CT code"):
        write_dicom_seg(series["mask"], series["root"] / "series", {"liver": 1}, card, tmp_path / "seg.dcm",
                        ALGORITHM)
