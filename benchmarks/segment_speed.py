"""End-to-end `medclipsam segment` speed on a routine CT: a 300-slice 512 x 512 phantom at scanner geometry (1 mm
slices, 0.78 mm pixels), text-only with 1 and 5 organs, the slice encoder on OpenVINO (the default on a CPU; its
one-time conversion timed first, apart) and on PyTorch, 5 organs also in full precision (--no-amp); each run in its
own process through the CLI (wall seconds, peak RSS of that process), against bare LiteMedSAM encoder passes over all
300 slices (PyTorch, full precision, as LiteMedSAM runs by itself; one pass timed on a sample of slices in this
process, times 300). Then the Dice of the model's working slice spacing (the fast default) against
every slice, on that phantom and on the real CT re-gridded to 1 mm slices. Prints and writes a Markdown table.

    python benchmarks/segment_speed.py [--model default] [--timing-only | --dice-only]
                                       [--out benchmarks/results/segment_speed.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import load_card
from medclipsam.data.intensity import intensity_transform
from medclipsam.data.phantom import ScannerGeometry, make_scanner_phantom
from medclipsam.experiments.real_scans import Scan, fast_vs_every_slice, regrid
from medclipsam.inference import openvino_encoder
from medclipsam.models.factory import create_model
from medclipsam.runtime import tune_allocator
from medclipsam.models.sam import build_sam_backbone

ORGANS = ["liver", "spleen", "right kidney", "left kidney", "aorta"]
CT = ScannerGeometry(matrix=512, pixel_mm=0.78, slice_mm=1.0, slices=300, z_centre_mm=20.0, arms="up",
                     offset_mm=(10.0, -15.0), phase="portal venous", noise_hu=14.0)
REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct_abdomen"


def conversion_seconds(model: str) -> float:
    """Seconds to convert the model's frozen image path to OpenVINO (into the cache named by the environment)."""
    start = time.perf_counter()
    openvino_encoder.OpenVINOImagePath(create_model(model, concepts=ORGANS[:1]))
    return time.perf_counter() - start


def timed_segment(scan: Path, organs: list[str], model: str, out: Path, *options: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of `medclipsam segment` (with `options`) in a fresh process."""
    command = [sys.executable, "-m", "medclipsam.cli", "segment", str(scan), "--out", str(out), "--model", model,
               "--quiet", *options, *[arg for organ in organs for arg in ("--prompt", organ)]]
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest of all children so far
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), command)
    return seconds, usage.ru_maxrss / 2**20


@torch.no_grad()
def encoder_seconds_per_slice(image: np.ndarray, sample: int = 16) -> float:
    """Bare LiteMedSAM: one encoder pass per 256 x 256 slice, timed on `sample` slices (the first is a warm-up)."""
    backbone = build_sam_backbone("litemedsam").eval()
    windowed = torch.as_tensor(np.asarray(intensity_transform("CT", "abdomen")(image[None])))[0]
    picks = np.linspace(0, image.shape[2] - 1, sample + 1).astype(int)
    slices = [torch.nn.functional.interpolate(windowed[None, None, :, :, i].float(), size=(256, 256),
                                              mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
              for i in picks]
    backbone.encode(slices[0])
    start = time.perf_counter()
    for pixels in slices[1:]:
        backbone.encode(pixels)
    return (time.perf_counter() - start) / sample


def timing_rows(scan: Path, image: np.ndarray, model: str, folder: Path) -> list[str]:
    """The timed rows: the bare encoder over 300 slices, the one-time conversion, then `segment` runs."""
    os.environ[openvino_encoder.CACHE_ENV] = str(folder / "cache")  # a cold cache: the conversion is timed
    encoder = 300 * encoder_seconds_per_slice(image)
    converting = conversion_seconds(model)
    print(f"one-time OpenVINO conversion: {converting:.0f} s", flush=True)
    lines = ["| organs | encoder runtime | precision | segment, wall s | peak RSS GB | bare encoder over 300 slices, s "
             "| ratio |", "|---|---|---|---|---|---|---|"]
    runs = ((ORGANS[:1], "openvino", ()), (ORGANS, "openvino", ()), (ORGANS, "torch", ()),
            (ORGANS, "openvino", ("--no-amp",)))
    for organs, runtime, options in runs:
        seconds, peak = timed_segment(scan, organs, model, folder / f"out{len(lines)}", "--runtime", runtime,
                                      *options)
        precision = "full (--no-amp)" if options else "default (AMP)"
        lines.append(f"| {len(organs)} | {runtime} | {precision} | {seconds:.0f} | {peak:.2f} | {encoder:.0f} | "
                     f"{seconds / encoder:.2f} |")
        print(lines[-1], flush=True)
    return lines + ["", f"One-time conversion of the encoder to OpenVINO (cached per model and machine, not in the "
                        f"rows above): {converting:.0f} s."]


def dice_rows(scan: Path, truth: np.ndarray, model: str, folder: Path) -> list[str]:
    """Dice of the fast default against every slice, per organ and mean, on the phantom and the real CT at 1 mm."""
    card = load_card("phantom")
    rows = {"phantom (1 mm slices)": fast_vs_every_slice(model, scan, truth, {o: card.resolve(o).label_id
                                                                             for o in ORGANS})}
    real = nib.load(REAL_CT / "ct.nii.gz")
    ct = Scan(np.asarray(real.dataobj).astype(np.int16),
              np.asarray(nib.load(REAL_CT / "labels.nii.gz").dataobj).astype(np.int16), real.affine)
    thin = regrid(ct, (3.0, 3.0, 1.0), (*ct.image.shape[:2], 3 * (ct.image.shape[2] - 1) + 1), table_hu=None)
    nib.save(nib.Nifti1Image(thin.image, thin.affine), folder / "real_1mm.nii.gz")
    totalseg = load_card("totalsegmentator")
    rows["real CT re-gridded to 1 mm slices"] = fast_vs_every_slice(
        model, folder / "real_1mm.nii.gz", thin.label, {o: totalseg.resolve(o).label_id for o in ORGANS})
    lines = ["| scan | path | " + " | ".join(ORGANS) + " | mean | fast vs every slice |",
             "|---|---|" + "---|" * (len(ORGANS) + 2)]
    for name, s in rows.items():
        for path, label in (("fast", "working spacing (fast)"), ("every slice", "every slice")):
            agreement = f"{s['agreement']:.3f}" if path == "fast" else ""
            lines.append(f"| {name} | {label} | " + " | ".join(f"{s[f'{path} {o}']:.3f}" for o in ORGANS)
                         + f" | **{s[path]:.3f}** | {agreement} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "segment_speed.md"))
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--timing-only", action="store_true", help="leave out the Dice of fast vs every slice")
    parts.add_argument("--dice-only", action="store_true", help="leave out the timed rows")
    args = parser.parse_args()
    tune_allocator()  # as the CLI does
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    phantom = make_scanner_phantom(3, CT)
    lines = [f"# `medclipsam segment` on a 300-slice 512 x 512 CT ({machine}; model {args.model})", ""]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scan = folder / "ct300.nii.gz"
        phantom.to_nifti(scan, folder / "truth.nii.gz")
        if not args.dice_only:
            lines += timing_rows(scan, phantom.image, args.model, folder) + [""]
        if not args.timing_only:
            lines += dice_rows(scan, phantom.label, args.model, folder)
    finish(args.out, lines)


def finish(out: str, lines: list[str]) -> None:
    """Write the table atomically and print it."""
    text = "\n".join(lines) + "\n"
    atomic_write(Path(out), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    print(text)


if __name__ == "__main__":
    main()
