"""Speed and memory of the segmentation methods per SAM backbone, all in one process per (method, backbone):
per-slice latency, slices/s at the best batch size, seconds for a CT volume (300 slices of 512 x 512 by default)
with 1 and with 5 organs, peak memory, trainable / total parameters, and the cost relative to one bare backbone
encoder pass per slice, timed in the same process on the same slices.

Timing does not depend on trained weights, so methods are built untrained (a SAM ViT without a checkpoint gets random
weights; its label says so). In the text setting every organ is made to be found on every slice (similarity maps
forced positive), so methods that skip absent organs are timed at their worst case. CUDA runs use bf16 autocast
(fp16 where bf16 is unsupported); CPU runs float32. `benchmarks/speed_memory.py` is the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.utils import convert_to_tensor
from segment_anything import sam_model_registry

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import PHANTOM_CARD, make_phantom
from medclipsam.data.slices import frame_case
from medclipsam.errors import MedClipSamError
from medclipsam.eval.evaluate import segment_case
from medclipsam.inference.predictor import Predictor, pick_device
from medclipsam.methods.base import SegmentationMethod
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.models.factory import build_method
from medclipsam.models.sam import SamBackbone, build_sam_backbone
from medclipsam.models.vision_language import VisionLanguageBackbone

TIMED_ORGANS = ("liver", "spleen", "right kidney", "left kidney", "aorta")  # the first 1, 5, ... are segmented
BACKBONE_METHODS = ("clip_guided_sam", "sam_lora", "two_stage", "esc_net")  # methods built on a SAM backbone
RANDOM_INIT_VITS = {"vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h", "medsam": "vit_b"}
FOUND_BIAS = 20.0  # similarity bias that makes every organ "found" (worst-case text-only timing)


@dataclass(frozen=True)
class SpeedConfig:
    """One measurement: a method on a backbone (None for methods without one) and how to time it."""

    method: str
    backbone: str | None = "litemedsam"
    setting: str = "text"
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    slices: int = 300  # slices of the volume actually segmented
    target_slices: int = 300  # slices of the CT the figures are for (extrapolated per slice when larger)
    size: int = 512  # in-plane size of the CT
    organs: tuple[int, ...] = (1, 5)
    adapter_blocks: str = "last1"  # CLIP-Guided SAM's adapted encoder blocks
    repeats: int = 3  # timed calls per batch size (median)
    clock: str = "wall"  # "wall", or "cpu" (process CPU time; CPU runs only)
    warmup: int = 1  # untimed calls before timing
    device: str = "auto"
    threads: int = 0  # CPU threads (0: torch's default)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    return f"{model} ({torch.get_num_threads()} threads)"


def autocast_for(device: torch.device) -> tuple[contextlib.AbstractContextManager, str]:
    """Mixed precision on CUDA (bf16, else fp16) and its name; float32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext(), "fp32"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), f"{'bf16' if dtype == torch.bfloat16 else 'fp16'} autocast"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: torch.cuda.max_memory_allocated on CUDA, else the process's peak resident set (RSS), never
    below the RSS now (Linux updates ru_maxrss lazily: it was seen 0.07 MB under /proc/self/statm)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, _resident_mb() or 0.0)


def _resident_mb() -> float | None:
    """The resident set now from /proc/self/statm (Linux), else None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm", encoding="utf-8") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20
    return None


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: torch.cuda.memory_allocated on CUDA, else the resident set (Linux; peak RSS elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    resident = _resident_mb()
    return peak_memory_mb(device) if resident is None else resident


def timing_backbone(name: str) -> tuple[SamBackbone, str]:
    """A registered backbone with its weights, or for a SAM ViT (which needs a checkpoint) the same architecture
    with random weights from segment_anything's registry: speed and memory do not depend on the values."""
    if name not in RANDOM_INIT_VITS:
        return build_sam_backbone(name), name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sam = sam_model_registry[RANDOM_INIT_VITS[name]](checkpoint=None)
    backbone = SamBackbone(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, name=name, family="vit",
                           image_size=sam.image_encoder.img_size)
    return backbone.eval(), f"{name} (random init)"


def build_timed_method(config: SpeedConfig, concepts: Sequence[str]) -> tuple[SegmentationMethod, str]:
    """The untrained method over `concepts` and the label of its backbone ("-" if it has none)."""
    if config.method not in BACKBONE_METHODS:
        return build_method(config.method, concepts, image_size=256), "-"
    if config.backbone is None:
        raise ValueError(f"{config.method} needs a SAM backbone")
    backbone, label = timing_backbone(config.backbone)
    if config.method == "clip_guided_sam":
        model_config = CLIPGuidedSAMConfig(sam=config.backbone, adapter_blocks=config.adapter_blocks,
                                           vision_language_kwargs={"sam_channels": backbone.embedding_dim})
        model = CLIPGuidedSAM(model_config, sam=backbone)
        method = build_method("clip_guided_sam", concepts, model=model)
        label += f", adapters {config.adapter_blocks}"
    else:
        method = build_method(config.method, concepts, sam=backbone)
    return method, label


def parameter_totals(method: SegmentationMethod) -> tuple[int, int]:
    """(trainable, total) parameters; the total includes a frozen text encoder held outside the modules (MiniLM)."""
    total = sum(p.numel() for p in {id(p): p for p in method.parameters()}.values())
    for module in method.modules():
        encoder = getattr(module, "text_encoder", None) if isinstance(module, VisionLanguageBackbone) else None
        if encoder is not None and not isinstance(encoder, torch.nn.Module):
            total += sum(p.numel() for p in encoder.model.parameters())
    return method.trainable_parameters(), total


def benchmark_volume(slices: int, target_slices: int, size: int) -> dict:
    """The central `slices` slices of a CT of `target_slices` slices of size x size (a phantom, in HU, resampled;
    only those slices are built): {"image": (1, size, size, slices) MetaTensor, "label", "case_id"}."""
    phantom = make_phantom(0)
    depth = phantom.image.shape[2]
    image = convert_to_tensor(phantom.image[None], track_meta=False).float()
    image = F.interpolate(image.permute(3, 0, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    label = F.interpolate(torch.from_numpy(phantom.label).float().permute(2, 0, 1)[:, None], size=(size, size),
                          mode="nearest")
    first = max((target_slices - slices) // 2, 0)
    position = ((torch.arange(first, first + slices) + 0.5) * depth / target_slices - 0.5).clamp(0, depth - 1)
    low = position.floor().long()
    high, weight = (low + 1).clamp(max=depth - 1), (position - low).view(-1, 1, 1, 1)
    image = image[low] * (1 - weight) + image[high] * weight  # linear along z, (slices, 1, size, size)
    label = label[position.round().long()]
    spacing = [*(phantom.spacing[i] * phantom.image.shape[i] / size for i in range(2)),
               phantom.spacing[2] * depth / target_slices]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return {"image": MetaTensor(image.permute(1, 2, 3, 0).contiguous(), affine=affine),
            "label": MetaTensor(label.permute(1, 2, 3, 0).to(torch.uint8), affine=affine), "case_id": "benchmark"}


def timed(call: Callable[[], Any], device: torch.device, repeats: int, clock: str = "wall") -> float:
    """Median seconds of `repeats` calls: wall time (CUDA synchronised), or this process's CPU time ("cpu": what a
    dedicated core would take for single-threaded work on a shared machine)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    seconds = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = now()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(now() - start)
    return statistics.median(seconds)


def force_every_concept_found(method: SegmentationMethod) -> None:
    """Make every similarity map positive everywhere, so text-only prompting finds (and decodes) every organ."""
    for name, parameter in method.named_parameters():
        if name.endswith("similarity_bias"):
            parameter.data.fill_(FOUND_BIAS)


def central_boxes(count: int, concepts: int, size: int) -> torch.Tensor:
    """(count, concepts, 4) manual-mode boxes over the central half of a size x size slice."""
    return torch.tensor([size / 4, size / 4, 3 * size / 4, 3 * size / 4]).expand(count, concepts, 4).clone()


def time_batches(method: SegmentationMethod, images: torch.Tensor, concept: str, config: SpeedConfig,
                 device: torch.device) -> dict[int, float]:
    """Seconds of one `predict` call on the first b images, for one concept, per batch size b. Every call gets
    slightly different pixels, so no method can serve it from a cache of the previous call's encoding."""
    calls = iter(range(1, 1 << 30))

    def call(batch: int) -> Callable[[], Any]:
        size = method.image_size
        boxes = central_boxes(batch, 1, size).to(device) if config.setting == "manual" else None
        return lambda: method.predict(images[:batch] * (1 - 1e-6 * next(calls)), [concept], boxes)

    for _ in range(config.warmup):
        call(1)()
    return {batch: timed(call(batch), device, config.repeats, config.clock) for batch in config.batch_sizes}


def time_volume(method: SegmentationMethod, case: dict, concepts: Sequence[str], config: SpeedConfig, batch: int,
                device: torch.device) -> dict[int, float]:
    """Seconds to segment the whole case through the predictor (frame, encoding, prediction, mapping back,
    clean-up) with the first k concepts, per k in `config.organs`."""
    card = load_card(PHANTOM_CARD)
    seconds = {}
    for count in config.organs:
        ids = [card.resolve(c).label_id for c in concepts[:count]]
        sub_card = dataclasses.replace(card, concepts={i: card.concepts[i] for i in ids})
        predictor = Predictor(method, device=device, batch_size=batch)
        seconds[count] = timed(partial(segment_case, predictor, case, sub_card, config.setting), device, 1,
                               config.clock)
    return seconds


def time_encoder(name: str, images: torch.Tensor, config: SpeedConfig, device: torch.device) -> float:
    """Seconds per image of one bare encoder pass of a fresh copy of backbone `name` on `images` (one batch)."""
    bare = timing_backbone(name)[0].to(device).eval()
    for _ in range(config.warmup):
        bare.encode(images[:1])
    return timed(lambda: bare.encode(images), device, config.repeats, config.clock) / len(images)


def measure(config: SpeedConfig) -> dict:
    """Time and measure one (method, backbone) as `config` says; one result row (see `format_table`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    if config.clock not in ("wall", "cpu") or (config.clock == "cpu" and device.type == "cuda"):
        raise ValueError(f"clock={config.clock!r}: use 'wall', or 'cpu' for CPU runs")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    precision_context, precision = autocast_for(device)
    concepts = list(TIMED_ORGANS[:max(config.organs)])
    row: dict[str, Any] = {"method": config.method, "backbone": config.backbone or "-", "setting": config.setting,
                           "device": device_name(device), "precision": precision, "clock": config.clock,
                           "start_memory_mb": current_memory_mb(device)}
    try:
        method, row["backbone"] = build_timed_method(config, concepts)
    except MedClipSamError as error:
        return {**row, "note": f"unavailable: {error}"}
    if config.setting not in method.settings:
        return {**row, "note": f"no {config.setting} setting"}
    method = method.to(device).eval()
    row["trainable_params"], row["total_params"] = parameter_totals(method)
    case = benchmark_volume(config.slices, config.target_slices, config.size)
    model_slices = frame_case(case, method.frame).images.expand(-1, 3, -1, -1)
    images = torch.stack([model_slices[i % len(model_slices)] for i in range(max(config.batch_sizes))]).to(device)
    scale = config.target_slices / config.slices
    with torch.no_grad(), precision_context:
        if config.setting == "text":
            force_every_concept_found(method)
        per_batch = time_batches(method, images, concepts[0], config, device)
        best, smallest = max(per_batch, key=lambda b: b / per_batch[b]), min(per_batch)
        row.update(latency_batch=smallest, latency_ms=1000 * per_batch[smallest] / smallest, best_batch=best,
                   slices_per_s=best / per_batch[best], slices_measured=config.slices,
                   volume_slices=config.target_slices)
        volume = time_volume(method, case, concepts, config, best, device)
        row.update({f"volume_s_{count}": seconds * scale for count, seconds in volume.items()})
        row.update(peak_memory_mb=peak_memory_mb(device),
                   memory="cuda max allocated" if device.type == "cuda" else "peak RSS")
        if config.method in BACKBONE_METHODS:  # after the memory reading: the extra backbone is not the method's
            encoder = time_encoder(config.backbone, images[:best], config, device)
            row["encoder_ms_per_slice"] = 1000 * encoder
            row.update({f"x_encoder_{count}": seconds / config.slices / encoder for count, seconds in volume.items()})
    row["volume_basis"] = ("measured" if scale == 1 else
                           f"extrapolated from {config.slices} slice{'s' if config.slices > 1 else ''}")
    return row


def measure_isolated(config: SpeedConfig) -> dict:
    """`measure` in a fresh process, so that its peak memory is this configuration's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, config).result()


def _number(value: Any, digits: int) -> str:
    return "" if value is None or value == "" else f"{float(value):.{digits}f}"


def _millions(value: Any) -> str:
    return "" if value is None or value == "" else f"{float(value) / 1e6:.2f}M"


def format_table(rows: Sequence[dict], organs: Sequence[int] = (1, 5)) -> str:
    """Markdown table of result rows (CT seconds are per volume; "x encoder" is the per-slice cost of segmenting the
    volume in units of one bare encoder pass per slice; clock "cpu" means process CPU seconds)."""
    header = ["method", "backbone", "setting", "device", "precision", "clock", "latency ms/slice, 1 organ",
              "slices/s (best batch)", *[f"CT s, {k} organ{'s' if k > 1 else ''}" for k in organs],
              "CT figures", "encoder ms/slice", *[f"x encoder, {k} organ{'s' if k > 1 else ''}" for k in organs],
              "peak memory MB", "trainable / total params", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        best = row.get("best_batch")
        cells = [row["method"], row["backbone"], row["setting"], row["device"], row["precision"], row.get("clock", ""),
                 _number(row.get("latency_ms"), 0) + (f" (batch {row['latency_batch']})"
                                                      if row.get("latency_batch") not in (None, "", 1, "1") else ""),
                 f"{_number(row.get('slices_per_s'), 2)} (batch {int(float(best))})" if best not in (None, "") else "",
                 *[_number(row.get(f"volume_s_{k}"), 1) for k in organs], row.get("volume_basis", ""),
                 _number(row.get("encoder_ms_per_slice"), 0), *[_number(row.get(f"x_encoder_{k}"), 2) for k in organs],
                 f"{_number(row.get('peak_memory_mb'), 0)} ({row['memory']}; "
                 f"{_number(row.get('start_memory_mb'), 0)} before building)" if row.get("memory") else "",
                 f"{_millions(row.get('trainable_params'))} / {_millions(row.get('total_params'))}"
                 if row.get("total_params") not in (None, "") else "", row.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
