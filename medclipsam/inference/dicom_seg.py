"""DICOM SEG output: a label map on a DICOM series' own voxel grid written as a BINARY Segmentation (highdicom) that
references the series, one segment per organ present, coded with the concept card's SNOMED CT codes.

Each SEG frame is taken from the label map at the voxels of one source slice, found from that slice's own position,
orientation and pixel spacing (not from a reader's slice order), so frames equal the NIfTI mask voxel for voxel.
Series that a voxel grid cannot describe exactly (gantry tilt, missing or uneven slices, multi-frame images) are
refused. An organ with no voxel cannot be a segment: it is left out and named in `SegWritten.omitted`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from medclipsam import __version__
from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import ConceptCard, load_card
from medclipsam.data.io import NIFTI_SUFFIXES, load_scan
from medclipsam.data.snomed import Code
from medclipsam.errors import InputError, OutputExistsError

NEEDS_SERIES = "DICOM SEG needs a DICOM series: pass the series folder"
GRID_TOL_VOXELS = 0.25  # how far (in voxels) a source pixel centre may lie from its voxel's centre
DUPLICATE_TOL_MM = 0.01
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                  "FrameOfReferenceUID", "SOPInstanceUID")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SEGMENT_DESCRIPTION_CHARS = 1024  # Segment Description (0062,0006) is a DICOM ST value


@dataclass(frozen=True)
class Algorithm:
    """The algorithm named in the SEG: its name, version and the model (checkpoint) it ran with."""

    name: str
    version: str
    model: str


@dataclass(frozen=True)
class SegWritten:
    """A written SEG: its path, the segment number of each organ in it, and the organs left out as empty."""

    path: Path
    segments: dict[str, int]
    omitted: tuple[str, ...]


@dataclass(frozen=True)
class _Series:
    """A checked single-frame series: instances sorted along the slice normal and their shared geometry (LPS)."""

    instances: list[pydicom.Dataset]
    row_step: np.ndarray
    column_step: np.ndarray


def _floats(value: Any) -> np.ndarray:
    """A DICOM multi-valued decimal string as float64."""
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _read_instances(folder: Path) -> list[pydicom.Dataset]:
    """Every DICOM file directly in `folder` (headers only), refusing a folder with none or with several series."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else (
            "is a NIfTI file" if folder.name.lower().endswith(NIFTI_SUFFIXES) else "is not a folder")
        raise InputError(folder, f"{what}; {NEEDS_SERIES}",
                         "Segment the DICOM series folder itself, or write NIfTI output for this scan")
    instances = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            instances.append(pydicom.dcmread(path, stop_before_pixels=True))
        except InvalidDicomError:
            continue  # not a DICOM file (e.g. a note beside the series)
        except Exception as err:  # a truncated or corrupt DICOM file
            raise InputError(path, f"is an unreadable DICOM file ({type(err).__name__}: {err})",
                             "Export the series again from the scanner or PACS") from err
    if not instances:
        raise InputError(folder, f"holds no DICOM files; {NEEDS_SERIES}", "Pass the folder of the DICOM series")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in instances})
    if len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series ({', '.join(series)})",
                         "Move each series into its own folder and pass the folder that was segmented")
    return instances


def _check_single_frame(folder: Path, instances: Sequence[pydicom.Dataset]) -> None:
    """Refuse multi-frame (enhanced) images and instances without the geometry tags a SEG references."""
    for ds in instances:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise InputError(folder, f"holds a multi-frame (enhanced) DICOM image ({ds.filename}); medclipsam "
                             "writes DICOM SEG only for classic single-frame series",
                             "Export the scan from the scanner or PACS as a classic single-frame series, or write "
                             "NIfTI output")
        missing = [tag for tag in _GEOMETRY_TAGS if tag not in ds]
        if missing:
            raise InputError(folder, f"{ds.filename} lacks {', '.join(missing)}, which a DICOM SEG needs to "
                             "reference the series", "Use the series as exported by the scanner or PACS")


def _shared(folder: Path, instances: Sequence[pydicom.Dataset], name: str, value: Any) -> None:
    """Refuse a series whose slices differ in the attribute that `value(ds)` reads."""
    first = value(instances[0])
    for ds in instances[1:]:
        if not np.allclose(value(ds), first, atol=1e-4):
            raise InputError(folder, f"its slices differ in {name} ({ds.filename})",
                             "Pass one consistent series (one acquisition, one reconstruction)")


def _check_series(folder: Path, instances: list[pydicom.Dataset]) -> _Series:
    """Sort slices along their normal and refuse what a regular voxel grid cannot hold exactly."""
    _check_single_frame(folder, instances)
    if len({str(ds.FrameOfReferenceUID) for ds in instances}) > 1:
        raise InputError(folder, "its slices have different Frame of Reference UIDs",
                         "Pass one series acquired in one frame of reference")
    _shared(folder, instances, "orientation (ImageOrientationPatient): slices are not parallel",
            lambda ds: _floats(ds.ImageOrientationPatient))
    _shared(folder, instances, "pixel spacing", lambda ds: _floats(ds.PixelSpacing))
    _shared(folder, instances, "matrix size (Rows, Columns)", lambda ds: np.asarray([ds.Rows, ds.Columns]))
    cosines = _floats(instances[0].ImageOrientationPatient)
    along_row, along_column = cosines[:3], cosines[3:]
    normal = np.cross(along_row, along_column)
    instances.sort(key=lambda ds: float(_floats(ds.ImagePositionPatient) @ normal))
    offsets = np.stack([_floats(ds.ImagePositionPatient) for ds in instances])
    offsets -= offsets[0]
    spacing = _floats(instances[0].PixelSpacing)  # (between rows, between columns)
    sideways = np.abs(np.stack([offsets @ along_row / spacing[1], offsets @ along_column / spacing[0]]))
    if sideways.max() > GRID_TOL_VOXELS:
        shift = float(np.linalg.norm(offsets[-1] - (offsets[-1] @ normal) * normal))
        raise InputError(folder, f"its slices are sheared, not stacked along their normal ({shift:.2f} mm sideways "
                         "from first to last slice): a gantry-tilted acquisition that a voxel grid cannot hold",
                         "Resample the series to an untilted grid on the scanner or workstation, or write NIfTI output")
    along = offsets @ normal
    if len(instances) > 1 and np.diff(along).min() < DUPLICATE_TOL_MM:
        raise InputError(folder, "two slices share a position", "Remove duplicate slices from the series folder")
    if len(instances) > 2:
        gap = along[-1] / (len(instances) - 1)
        uneven = np.abs(along - gap * np.arange(len(instances))).max()
        if uneven > GRID_TOL_VOXELS * gap:
            raise InputError(folder, f"its slices are not evenly spaced (one lies {uneven:.2f} mm off an even "
                             f"{gap:.3g} mm grid): missing slices or a variable-spacing reconstruction",
                             "Pass the complete, evenly spaced series")
    return _Series(instances, row_step=spacing[0] * along_column, column_step=spacing[1] * along_row)


def _label_grid(label_map: Any, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label map as an (X, Y, Z) integer array and its RAS affine; plain arrays take the series' affine as
    medclipsam reads it (`load_scan`)."""
    if isinstance(label_map, (str, Path)):
        path = Path(label_map)
        if not path.is_file() or not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise InputError(path, "is not a NIfTI label map file", "Pass the mask medclipsam wrote (.nii.gz)")
        image = nib.load(str(path))
        data, affine = np.asanyarray(image.dataobj), image.affine
    elif isinstance(label_map, MetaTensor):
        data, affine = label_map.as_tensor().cpu().numpy(), label_map.affine.cpu().numpy()
    else:
        data = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
        affine = load_scan(folder).affine.cpu().numpy()
    data = data[0] if data.ndim == 4 and data.shape[0] == 1 else data
    integral = np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.bool_) or (
        np.all(np.isfinite(data)) and np.all(data == np.round(data)))
    if data.ndim != 3 or not integral or (data.size and data.min() < 0):
        raise InputError(str(label_map) if isinstance(label_map, (str, Path)) else None,
                         "the label map is not a 3D map of class ids 0, 1, 2, ...", "Pass the mask medclipsam wrote")
    dtype = np.min_scalar_type(int(data.max()) if data.size else 0)
    return data.astype(dtype, copy=False), np.asarray(affine, dtype=np.float64)


def _frames(labels: np.ndarray, affine: np.ndarray, series: _Series, folder: Path) -> np.ndarray:
    """(slices, rows, columns) label values at each source pixel's voxel; refuses a map off the series' grid."""
    to_index = np.linalg.inv(_LPS_FROM_RAS @ affine)
    step_column = to_index[:3, :3] @ series.column_step
    step_row = to_index[:3, :3] @ series.row_step
    off_grid = InputError(folder, f"the label map (shape {labels.shape}) is not on this series' voxel grid",
                          "Pass the mask medclipsam wrote for this series (same shape and affine)")
    for step in (step_column, step_row):
        if not np.allclose(np.abs(step), np.round(np.abs(step)), atol=GRID_TOL_VOXELS) or \
                round(float(np.abs(step).sum())) != 1:
            raise off_grid  # a source pixel step must be one voxel along one axis
    in_plane = {int(np.argmax(np.abs(step_column))), int(np.argmax(np.abs(step_row)))}
    if len(in_plane) != 2:
        raise off_grid
    slice_axis = ({0, 1, 2} - in_plane).pop()
    rows, columns = int(series.instances[0].Rows), int(series.instances[0].Columns)
    row_index, column_index = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    frames = np.empty((len(series.instances), rows, columns), dtype=labels.dtype)
    slice_indices = set()
    for k, ds in enumerate(series.instances):
        origin = to_index @ np.append(_floats(ds.ImagePositionPatient), 1.0)
        exact = [origin[a] + column_index * step_column[a] + row_index * step_row[a] for a in range(3)]
        index = [np.rint(e).astype(np.int64) for e in exact]
        if max(float(np.abs(e - i).max()) for e, i in zip(exact, index)) > GRID_TOL_VOXELS or \
                any(i.min() < 0 or i.max() >= n for i, n in zip(index, labels.shape)):
            raise off_grid
        slice_indices.add(int(round(origin[slice_axis])))
        frames[k] = labels[index[0], index[1], index[2]]
    if len(slice_indices) != len(series.instances) or rows * columns * len(series.instances) != labels.size:
        raise off_grid
    return frames


def _coded(code: Code, version: str, modifier: Code | None, modifier_attribute: str) -> hd.sr.CodedConcept:
    """The code as a DICOM coded concept, with `modifier` nested under `modifier_attribute` when given."""
    concept = hd.sr.CodedConcept(code.value, "SCT", code.meaning, version)
    if modifier is not None:
        setattr(concept, modifier_attribute, [hd.sr.CodedConcept(modifier.value, "SCT", modifier.meaning, version)])
    return concept


def _description(number: int, name: str, card: ConceptCard, algorithm: hd.AlgorithmIdentificationSequence
                 ) -> hd.seg.SegmentDescription:
    """A segment coded with the card's SNOMED CT codes (type modifier, anatomic region and note when present)."""
    concept = card.resolve(name)
    coding = concept.coding
    if coding is None or card.coding_scheme is None:
        raise InputError(card.name, f"concept {concept.name!r} (label {concept.label_id}) has no SNOMED CT code, "
                         "which a DICOM SEG segment needs",
                         "Add 'code: {category: ..., type: ...}' under that label and a card-level 'coding_scheme' "
                         "(see data_cards/README.md)")
    version = card.coding_scheme.version
    region = None if coding.region is None else _coded(coding.region, version, coding.region_modifier,
                                                        "AnatomicRegionModifierSequence")
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=concept.name[:64],
        segmented_property_category=hd.sr.CodedConcept(coding.category.value, "SCT", coding.category.meaning, version),
        segmented_property_type=_coded(coding.type, version, coding.type_modifier,
                                       "SegmentedPropertyTypeModifierCodeSequence"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[region] if region else None,
    )
    if coding.note:
        description.SegmentDescription = coding.note[:_SEGMENT_DESCRIPTION_CHARS]
    return description


def _refuse_overwrite(out: Path, folder: Path, label_map: Any, overwrite: bool) -> None:
    """Refuse an output inside the series folder, over the label map, or over an existing file unless asked."""
    if out.resolve().parent == folder.resolve():
        raise OutputExistsError(out, "is inside the source series folder (it would add a second series to the "
                                "scan's folder); choose another folder")
    if isinstance(label_map, (str, Path)) and out.resolve() == Path(label_map).resolve():
        raise OutputExistsError(out, "is the input label map; choose another output path")
    if out.is_dir():
        raise InputError(out, "is a folder", "Give a file name for the SEG, e.g. segmentation.dcm")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(out, "already exists; pass overwrite=True (CLI: --overwrite) to replace it")


def write_dicom_seg(label_map: str | Path | np.ndarray | torch.Tensor, source_series: str | Path,
                    concepts: Mapping[str, int], card: ConceptCard | str | Path, out_path: str | Path,
                    algorithm: Algorithm, *, series_number: int | None = None, overwrite: bool = False) -> SegWritten:
    """Write the label map (NIfTI path, MetaTensor with its affine, or plain array in `load_scan(source_series)` voxel
    order) as a BINARY DICOM SEG of the series in `source_series`, one segment per concept (name -> label value).

    Segments are numbered by label value, coded from `card`, and name `algorithm`; the SEG shares the series' Frame of
    Reference and references its instances. Concepts with no voxel are left out (`SegWritten.omitted`); if none has
    any, InputError and no file. Written atomically; never over an input. Default series number: the source's + 1000.
    """
    folder, out = Path(source_series), Path(out_path)
    card = card if isinstance(card, ConceptCard) else load_card(card)
    series = _check_series(folder, _read_instances(folder))
    _refuse_overwrite(out, folder, label_map, overwrite)
    labels, affine = _label_grid(label_map, folder)
    frames = _frames(labels, affine, series, folder)
    size = max(int(frames.max()), *concepts.values(), 0) + 1
    counts = sum(np.bincount(frame.ravel(), minlength=size) for frame in frames)  # per slice: small temporaries
    ordered = sorted(concepts.items(), key=lambda item: item[1])
    present = [(name, value) for name, value in ordered if value > 0 and counts[value] > 0]
    omitted = tuple(name for name, value in ordered if (name, value) not in present)
    if not present:
        raise InputError(out, "no organ has a voxel in the label map, and a DICOM SEG cannot hold empty segments",
                         "Report the organs as absent (the NIfTI mask and report still say so); no SEG is written")
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version,
        parameters={"model": algorithm.model})
    lookup = np.zeros(int(frames.max()) + 1, dtype=np.uint16 if len(present) > 255 else np.uint8)
    for number, (_, value) in enumerate(present, start=1):
        lookup[value] = number
    source_number = int(series.instances[0].get("SeriesNumber", 0) or 0)
    seg = hd.seg.Segmentation(
        source_images=series.instances, pixel_array=lookup[frames], segmentation_type="BINARY",
        segment_descriptions=[_description(n, name, card, identification) for n, (name, _) in enumerate(present, 1)],
        series_instance_uid=hd.UID(), series_number=series_number or source_number + 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="medclipsam", manufacturer_model_name=algorithm.name,
        software_versions=f"medclipsam {__version__}", device_serial_number="none", content_label="MEDCLIPSAM",
        content_description=f"{algorithm.name} {algorithm.version} ({algorithm.model})"[:64],
        series_description=f"SEG {algorithm.name}"[:64],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda temp: seg.save_as(temp))
    return SegWritten(out, {name: n for n, (name, _) in enumerate(present, start=1)}, omitted)
