"""The `medclipsam segment` sub-command: its arguments and its run (the work is in medclipsam.inference.batch)."""
from __future__ import annotations

import argparse

from medclipsam.inference import exit_codes


def add_tta_option(parser: argparse.ArgumentParser) -> None:
    """--tta (test-time augmentation), for `segment` and `demo`."""
    parser.add_argument("--tta", dest="test_time_augmentation", action="store_true", help="test-time augmentation: "
                        "organs found by name are averaged over 5 views of each slice (scaled, moved); ~5x the time")


def _segment(args: argparse.Namespace) -> int:
    from medclipsam.inference.batch import SegmentOptions, run_batch

    same = {name: getattr(args, name) for name in ("inputs", "out", "model", "card", "coords", "modality", "window",
            "device", "batch_size", "runtime", "test_time_augmentation", "preview", "output_type", "statistics",
            "overwrite", "quiet")}
    return run_batch(SegmentOptions(prompts=args.prompt, boxes=args.box or (), points=args.point or (),
                                    cleanup=not args.no_cleanup, amp=not args.no_amp,
                                    slice_gate=not args.no_slice_gate,
                                    organ_offsets=not args.no_organ_offsets, **same))


def add_segment_command(commands: argparse._SubParsersAction) -> None:
    """Add `segment` to the sub-command parsers `commands`."""
    segment = commands.add_parser(
        "segment", help="segment organs by name in scans: label map NIfTI and/or DICOM SEG + volume report per scan",
        description="Segment organs by name (or by --box / --point, the others by name in the same run) in NIfTI/NRRD/"
        "MHA files, DICOM series folders or folders of them. Writes OUT/<scan>/labels.nii.gz (the scan's exact "
        "geometry) and/or segmentation.dcm (DICOM series only), report.json/csv (organs found nowhere reported "
        "absent) and, with --preview, preview.png, each scan's folder renamed into place only when complete, and "
        "OUT/summary.json. Re-running skips scans already done. OUT must be a folder you can write to, outside every "
        "input folder; while a run writes there, OUT/.medclipsam-segment.lock names its process and a second run into "
        "OUT stops (exit 2).", epilog=exit_codes.HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("inputs", nargs="+", metavar="SCAN_OR_FOLDER")
    segment.add_argument("--prompt", action="append", required=True, metavar="ORGAN", help="organ name (repeatable)")
    segment.add_argument("--out", required=True, help="output folder (one sub-folder per scan)")
    segment.add_argument("--model", help="checkpoint folder (a run's model/); default: medclipsam's shipped model")
    segment.add_argument("--card", default="phantom", help="concept card: organs, label values (default: phantom)")
    segment.add_argument("--box", action="append", metavar="ORGAN=X0,Y0,Z0,X1,Y1,Z1", help="a 3D box for one "
                         "--prompt organ (two opposite corners, inclusive, in --coords); others are segmented by name")
    segment.add_argument("--point", action="append", metavar="ORGAN=X,Y,Z", help="a point on one --prompt organ "
                         "(repeatable); prompts the axial slice it lies on")
    segment.add_argument("--coords", default="voxel", choices=["voxel", "ras", "lps"], help="--box/--point in the "
                         "file's voxel indices (0-based, default) or world mm, RAS (NIfTI, Slicer) or LPS (DICOM, ITK)")
    segment.add_argument("--modality", choices=["CT", "MR", "MRI"], help="default: the model's own modality")
    segment.add_argument("--window", default=None, help="CT window preset (default: the model's own)")
    segment.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    segment.add_argument("--batch-size", type=int, default=None,
                         help="slices per model batch (default: 4 on a CPU, 8 on CUDA)")
    segment.add_argument("--no-cleanup", action="store_true", help="keep raw masks (no 3D clean-up: components, holes)")
    segment.add_argument("--no-slice-gate", action="store_true", help="keep every slice of organs found by name "
                         "(else the model's slice gate, if it has one, drops slabs it calls invented)")
    segment.add_argument("--no-organ-offsets", action="store_true", help="one threshold (0.5) for every organ found "
                         "by name (else each organ's own, from the model's organ offsets if it has them)")
    segment.add_argument("--no-amp", action="store_true",
                         help="full precision (else float16 on CUDA, bfloat16 by name on AMX CPUs)")
    segment.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"], help="slice encoder on a "
                         "CPU (default: auto, OpenVINO when installed and there are 64 slices or more to encode)")
    add_tta_option(segment)
    segment.add_argument("--preview", action="store_true", help="also write preview.png (a few axial slices)")
    segment.add_argument("--output-type", default="nifti", choices=["nifti", "dicom_seg", "both"], help="labels."
                         "nii.gz, segmentation.dcm (DICOM SEG of the series, SNOMED CT coded) or both (default: nifti)")
    segment.add_argument("--statistics", action="store_true", help="add to the report per organ: intensity mean / SD "
                         "/ median (HU for CT), bounding box in world RAS mm, number of 3D components")
    segment.add_argument("--overwrite", action="store_true", help="redo scans already done")
    segment.add_argument("--quiet", action="store_true", help="no progress bars; only errors and failures")
    segment.set_defaults(run=_segment)
