"""Prompt-consistent training of CLIP-Guided SAM on cached frozen-trunk features.

The frozen encoder trunk (and the bare embedding) of every training slice is computed once (on a CPU by OpenVINO
under the "auto" runtime: 1.8 s a slice against 4.7 s on one thread after a one-time compile) and kept in memory as
float16; each step then runs only the adapted blocks, the prompt encoder and the mask decoder for its (slice, concept)
pairs. That is what makes training fit in CPU minutes. Training has two phases: a cheap warm-up of the similarity map
alone on sampled pixels (the dense projection is pointwise, so pixels suffice; text-only mode takes its prompts from
that map), then steps on sampled (slice, concept) pairs through the adapted encoder and the decoder, with prompts
simulated as they will be given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from tqdm.auto import tqdm

from medclipsam.atomic import atomic_write
from medclipsam.inference.openvino_encoder import encode_slices, image_path_runtime
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, ImageFeatures
from medclipsam.training import distributed
from medclipsam.training.losses import CLIPGuidedSAMLoss
from medclipsam.training.prompt_simulation import choose_modes, simulate_prompts
from medclipsam.training.run_log import CsvLog

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


@dataclass
class TrainConfig:
    """Optimisation settings; learning rates are per parameter group."""

    steps: int = 300  # steps on (slice, concept) pairs through the adapted encoder and the decoder
    similarity_steps: int = 2000  # warm-up steps of the similarity map alone, on sampled pixels (cheap)
    pairs_per_step: int = 8
    absent_fraction: float = 0.25  # share of pairs whose concept is absent from the slice (learn "empty")
    similarity_pixels_per_step: int = 4096  # half uniform, half spread evenly over the concepts' foregrounds
    mode: str = "text"  # "text", "box", "points" or "mixed": train as you will infer
    lr_adapters: float = 1e-3  # adapters and the text/similarity heads
    lr_similarity: float = 1e-3  # similarity map (VL projection, scale, bias) during the warm-up
    lr_similarity_pairs: float = 0.0  # ... and during pair steps: 0 keeps the warmed-up map fixed (measured: pair
    # steps that also move the map lost organs the map had found, e.g. spleen 0.82 -> 0.00 after 40 steps)
    lr_decoder: float = 1e-4
    lr_prompt_encoder: float = 1e-5
    weight_decay: float = 1e-4
    n_points: int = 5
    box_jitter: float = 0.1
    grad_accumulation: int = 1  # micro-batches per optimiser step
    amp: bool = True  # mixed precision on CUDA; ignored on CPU
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end); needs an output folder
    seed: int = 0

    @property
    def total_steps(self) -> int:
        """Warm-up plus pair steps."""
        return self.similarity_steps + self.steps


def similarity_parameters(model: CLIPGuidedSAM) -> list[torch.nn.Parameter]:
    """What the similarity map learns: the vision-language backbone's trainable part, the scale and the bias."""
    trainable = [p for p in model.vision_language.parameters() if p.requires_grad]
    return trainable + [model.similarity_scale, model.similarity_bias]


def parameter_groups(model: CLIPGuidedSAM, config: TrainConfig) -> list[dict]:
    """AdamW groups: similarity map (first, its lr switched by phase), adapters and heads, decoder, prompt encoder."""
    similarity = similarity_parameters(model)
    decoder = [p for p in model.mask_decoder.parameters() if p.requires_grad]
    prompt = [p for p in model.prompt_encoder.parameters() if p.requires_grad]
    taken = {id(p) for p in similarity + decoder + prompt}
    rest = [p for p in dict((id(p), p) for p in model.parameters()).values() if p.requires_grad and id(p) not in taken]
    groups = [{"params": similarity, "lr": config.lr_similarity}, {"params": rest, "lr": config.lr_adapters}]
    if decoder:
        groups.append({"params": decoder, "lr": config.lr_decoder})
    if prompt:
        groups.append({"params": prompt, "lr": config.lr_prompt_encoder})
    return groups


@torch.no_grad()
def cache_features(model: CLIPGuidedSAM, items: Sequence[dict], show_progress: bool = False,
                   runtime: str = "auto") -> list[ImageFeatures]:
    """Frozen features of every slice item, stored as float16 on the CPU; `runtime` picks the encoder of the frozen
    image path as `Predictor(runtime=...)` does ("auto": OpenVINO on a CPU for 64 slices or more), in float32."""
    model.eval()
    image_path = image_path_runtime(model, model.device, runtime, slices=len(items))
    return [
        encode_slices(model, item["image"][None].to(model.device), image_path).to("cpu", torch.float16)
        for item in tqdm(items, desc="caching slices", disable=not show_progress)
    ]


class PixelTable:
    """Every training pixel of the similarity grid: the vector the pointwise projection reads there and, per concept
    of the items' vocabulary, whether it lies in the concept's mask (area-downsampled, > 0.5) and whether the slice
    lists it."""

    def __init__(self, model: CLIPGuidedSAM, items: Sequence[dict], features: Sequence[ImageFeatures]) -> None:
        self.concepts = sorted({c for item in items for c in item["concepts"]})
        sources = torch.cat([model.dense_inputs(f) for f in features])  # (N, C, h, w) float16
        n, channels, h, w = sources.shape
        self.sources = sources.permute(0, 2, 3, 1).reshape(n * h * w, channels)
        targets = torch.zeros(n, len(self.concepts), h, w, dtype=torch.bool)
        known = torch.zeros(n, len(self.concepts), dtype=torch.bool)
        for i, item in enumerate(items):
            small = F.interpolate(item["masks"][:, None].float(), size=(h, w), mode="area")[:, 0] > 0.5
            for concept, mask in zip(item["concepts"], small):
                targets[i, self.concepts.index(concept)] = mask
                known[i, self.concepts.index(concept)] = True
        self.targets = targets.permute(0, 2, 3, 1).reshape(n * h * w, len(self.concepts))
        self.known = known.repeat_interleave(h * w, dim=0)
        self.foreground = [torch.nonzero(self.targets[:, k])[:, 0] for k in range(len(self.concepts))]

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sources (P, C), targets (P, V), known (P, V)): half uniform pixels, half spread over the foregrounds."""
        picks = [torch.randint(len(self.sources), (count - count // 2,), generator=generator)]
        present = [f for f in self.foreground if len(f)]
        for pixels in present:
            picks.append(pixels[torch.randint(len(pixels), (count // 2 // len(present),), generator=generator)])
        index = torch.cat(picks)
        return self.sources[index], self.targets[index], self.known[index]


class Trainer:
    """Trains a CLIPGuidedSAM on slice items (from `medclipsam.data.slices.slice_items`).

    With `out_dir`, it writes `log.csv` (one row per step), the model (through `save_model(folder)`, into
    `out_dir/model`) every `checkpoint_every` steps and at the end, and `trainer_state.pt`, from which a new Trainer
    on the same folder resumes.
    Under torch.distributed each rank samples with its own seed, gradients are averaged over ranks before every
    optimiser step, and only rank 0 writes. `runtime` encodes the slices ("auto", "torch" or "openvino"; see
    `cache_features`) unless their `features` are given.
    """

    def __init__(self, model: CLIPGuidedSAM, items: Sequence[dict], config: TrainConfig | None = None,
                 out_dir: str | Path | None = None, show_progress: bool = False,
                 features: Sequence[ImageFeatures] | None = None,
                 on_step: Callable[[int, int, dict[str, Any]], None] | None = None,
                 save_model: Callable[[Path, dict[str, Any]], None] | None = None, runtime: str = "auto") -> None:
        self.model, self.items, self.config = model, list(items), config or TrainConfig()
        self.on_step = on_step  # called with (steps done, total steps, the step's log row) after every step
        self.save_model = save_model  # writes the model into a folder, with metadata (needs an out_dir)
        if not self.items:
            raise ValueError("Trainer needs at least one slice item")
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.show_progress = show_progress
        set_determinism(seed=self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed + distributed.rank())
        distributed.broadcast_trainable(model)
        self.features = (list(features) if features is not None
                         else cache_features(model, self.items, show_progress, runtime))
        self.optimizer = torch.optim.AdamW(parameter_groups(model, self.config), weight_decay=self.config.weight_decay)
        cuda = model.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = self.config.amp and cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.autocast_dtype == torch.float16)
        self.loss = CLIPGuidedSAMLoss()
        self.pixels = PixelTable(model, self.items, self.features)
        self.present_pairs = [(i, k) for i, item in enumerate(self.items) for k, p in enumerate(item["present"]) if p]
        self.absent_pairs = [(i, k) for i, item in enumerate(self.items)
                             for k, p in enumerate(item["present"]) if not p]
        self.step_done = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------------ sampling
    def _draw(self, pool: Sequence, count: int) -> list:
        if count <= 0 or not pool:
            return []
        return [pool[int(i)] for i in torch.randint(len(pool), (count,), generator=self.generator)]

    def sample_pairs(self) -> list[tuple[int, int]]:
        """(slice, concept position) pairs for one micro-batch: present ones plus a share of absent ones."""
        n = self.config.pairs_per_step
        n_absent = round(n * self.config.absent_fraction) if self.absent_pairs else 0
        present = self._draw(self.present_pairs or self.absent_pairs, n - n_absent)
        return present + self._draw(self.absent_pairs, n_absent)

    # ------------------------------------------------------------------------------------------------ losses
    def _features(self, slices: Sequence[int]) -> ImageFeatures:
        return ImageFeatures.cat([self.features[i] for i in slices]).to(self.model.device, torch.float32)

    def similarity_loss(self) -> dict[str, torch.Tensor]:
        """Warm-up loss: BCE of the similarity logits of sampled pixels against every concept known there."""
        model, device = self.model, self.model.device
        sources, targets, known = self.pixels.sample(self.config.similarity_pixels_per_step, self.generator)
        grid = sources.to(device, torch.float32).T[None, :, None, :]  # pixels as a (1, C, 1, P) map
        dense = model.vision_language.project(grid)[0, :, 0].T  # (P, D)
        text = model.encode_concepts(self.pixels.concepts)
        logits = model.similarity_scale * dense @ text.T.to(dense.dtype) + model.similarity_bias
        weight = known.to(device, logits.dtype)
        value = F.binary_cross_entropy_with_logits(logits, targets.to(device, logits.dtype), weight=weight,
                                                   reduction="sum") / weight.sum().clamp(min=1)
        return {"total": value, "similarity": value}

    def pair_loss(self, pairs: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Main loss over (slice, concept) pairs, prompts simulated per pair in the configured mode."""
        model, device = self.model, self.model.device
        slices = sorted({i for i, _ in pairs})
        position = {s: p for p, s in enumerate(slices)}
        features = self._features(slices)
        concepts = [self.items[i]["concepts"][k] for i, k in pairs]
        masks = torch.stack([self.items[i]["masks"][k] for i, k in pairs]).to(device)
        present = [self.items[i]["present"][k] for i, k in pairs]
        text = model.encode_concepts(concepts)
        pair_index = torch.tensor([position[i] for i, _ in pairs], device=device)
        modes = choose_modes(self.config.mode, present, self.generator)
        terms: dict[str, torch.Tensor] = {}
        for mode in sorted(set(modes)):
            chosen = torch.tensor([i for i, m in enumerate(modes) if m == mode], device=device)
            prompts = simulate_prompts(masks[chosen].cpu(), [mode] * len(chosen), self.generator,
                                       self.config.n_points, self.config.box_jitter).to(device)
            out = model.decode(features.select(pair_index[chosen]), text[chosen], prompts)
            for name, value in self.loss(out, masks[chosen]).items():
                terms[name] = terms.get(name, 0.0) + value * len(chosen) / len(modes)
        return terms

    # ------------------------------------------------------------------------------------------------ loop
    def step(self) -> dict[str, float]:
        """One optimiser step (warm-up or pairs, by the step count) over `grad_accumulation` micro-batches."""
        model, config = self.model, self.config
        if not model.training:  # switching walks every submodule: ~16 ms a step on 2 cores, 16 s in 1000 steps
            model.train()
        warmup = self.step_done < config.similarity_steps
        self.optimizer.param_groups[0]["lr"] = config.lr_similarity if warmup else config.lr_similarity_pairs
        logged: dict[str, float] = {}
        for _ in range(config.grad_accumulation):
            with torch.autocast(model.device.type, dtype=self.autocast_dtype, enabled=self.use_amp):
                terms = self.similarity_loss() if warmup else self.pair_loss(self.sample_pairs())
            self.scaler.scale(terms["total"] / config.grad_accumulation).backward()
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + float(value.detach()) / config.grad_accumulation
        distributed.average_gradients(model.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_done += 1
        return {"step": self.step_done, "phase": "similarity" if warmup else "pairs", **logged}

    def fit(self) -> list[dict[str, float]]:
        """Run to `config.total_steps` (resuming from `out_dir` when it holds a trainer state); returns the log rows."""
        config = self.config
        log = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.resume()
            main = distributed.is_main_process()
            log = CsvLog(self.out_dir / "log.csv", keep_steps_up_to=self.step_done) if main else None
        bar = tqdm(total=config.total_steps, initial=self.step_done, desc="training", disable=not self.show_progress)
        while self.step_done < config.total_steps:
            row = self.step()
            self.history.append(row)
            if log is not None:
                log.write(row)
            bar.update(1)
            bar.set_postfix(phase=row["phase"], loss=f"{row['total']:.4f}")
            if self.on_step is not None:
                self.on_step(self.step_done, config.total_steps, row)
            every = config.checkpoint_every
            if self.out_dir is not None and every and self.step_done % every == 0:
                self.save()
        bar.close()
        if self.out_dir is not None:
            self.save()
        self.model.eval()
        return self.history

    # ------------------------------------------------------------------------------------------------ state
    def save(self) -> None:
        """The model in `out_dir/model` (when a `save_model` was given), then the resumable trainer state (both
        atomic; rank 0 writes, with every rank's random states). Under torch.distributed every rank must call it."""
        generators = distributed.gather_objects(self.generator.get_state())
        torch_states = distributed.gather_objects(torch.get_rng_state())
        if not distributed.is_main_process():
            return
        if self.save_model is not None:
            self.save_model(self.out_dir / MODEL_DIR, {"step": self.step_done, "train": asdict(self.config)})
        state = {
            "step": self.step_done,
            "model": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": generators,
            "torch": torch_states,
            "config": asdict(self.config),
        }
        atomic_write(self.out_dir / STATE_FILE, lambda temp: torch.save(state, temp))

    def resume(self) -> bool:
        """Load `out_dir/trainer_state.pt` if present (same config and number of ranks required, but `steps` may
        grow: that extends a finished run); True when it resumed."""
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved, current = dict(state["config"]), asdict(self.config)
        if {**saved, "steps": None} != {**current, "steps": None}:
            raise ValueError(f"{path} was written with another training config; use a new output folder "
                             "or the same settings to resume (only --steps may grow, to extend a run)")
        if int(state["step"]) > self.config.total_steps:
            raise ValueError(f"{path} is at step {state['step']}, past this run's {self.config.total_steps}; "
                             f"use --steps {saved['steps']} or more to resume it")
        generators, torch_states = state["generator"], state["torch"]  # one random state per rank
        if len(generators) != distributed.world_size():
            raise ValueError(f"{path} was written by {len(generators)} process(es); resume with as many "
                             "or use a new output folder")
        self.model.load_trainable_state_dict({k: v.to(self.model.device) for k, v in state["model"].items()}, str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(generators[distributed.rank()])
        torch.set_rng_state(torch_states[distributed.rank()])
        self.step_done = int(state["step"])
        return True
