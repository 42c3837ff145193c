"""The interface of every vision-language backbone: concept (organ name) embeddings, dense image features in the same
space, and their similarity map."""
from __future__ import annotations

import abc
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclipsam.errors import InputError, WeightsError

Concept = str | Sequence[str]

MEDICAL_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a computed tomography image of the {}.",
    "a CT scan showing the {}.",
    "an MRI scan showing the {}.",
    "a magnetic resonance image of the {}.",
    "the {} in a medical image.",
    "a radiology image of the {}.",
    "an abdominal scan with the {} visible.",
    "a cross-sectional medical image of the {}.",
)


def concept_key(concept: Concept) -> tuple[str, ...]:
    """A concept (a name or a list of synonyms) as a tuple of stripped, non-empty names; InputError otherwise."""
    names = (concept,) if isinstance(concept, str) else tuple(concept)
    cleaned = tuple(name.strip() for name in names if isinstance(name, str))
    if not cleaned or len(cleaned) != len(names) or not all(cleaned):
        raise InputError(
            None, f"concept {concept!r} is not a name or a list of names", "give an organ name such as 'liver', "
            "or a list of its synonyms such as ['liver', 'hepatic parenchyma']"
        )
    return cleaned


class VisionLanguageBackbone(nn.Module, abc.ABC):
    """Text embeddings of concepts, dense features in the same space, and their cosine similarity map.

    Dense features come in two cacheable steps, the same for every backbone: `image_features` (what the backbone
    reads from the [0, 1] image itself, computed once per slice; None if it reads nothing) and `dense_inputs` (the
    map a pointwise `project` turns into unit text-space features, built from SAM's embedding and those image
    features). Being pointwise, `project` also works on sampled pixels, which is how the similarity map trains.
    """

    embed_dim: int
    templates: tuple[str, ...] = MEDICAL_PROMPT_TEMPLATES

    def __init__(self) -> None:
        super().__init__()
        self._concept_cache: dict[tuple[str, ...], Tensor] = {}

    @abc.abstractmethod
    def _encode_texts(self, texts: list[str]) -> Tensor:
        """Raw text-encoder embeddings (N, D) of N strings, on this module's device."""

    @abc.abstractmethod
    def image_features(self, image01: Tensor) -> Tensor | None:
        """Concept-free features the backbone reads from (B, 3, H, W) images in [0, 1], or None."""

    @abc.abstractmethod
    def dense_inputs(self, sam_embedding: Tensor | None, image_features: Tensor | None) -> Tensor:
        """(B, C, h, w) input of `project`, from SAM's image embedding and/or this backbone's image features."""

    @abc.abstractmethod
    def project(self, inputs: Tensor) -> Tensor:
        """Unit-norm text-space features (B, D, h, w) from a `dense_inputs` map (pointwise, so any h, w)."""

    def trainable_part(self) -> nn.Module | None:
        """The part that learns the image-to-text alignment (a projection), or None when it needs no training."""
        return None

    def dense_features(self, image01: Tensor | None, sam_embedding: Tensor | None) -> Tensor:
        """Per-location features (B, D, h, w) in the text space, L2-normalised over D."""
        image_features = None if image01 is None else self.image_features(image01)
        return self.project(self.dense_inputs(sam_embedding, image_features))

    @property
    def device(self) -> torch.device:
        """Device of this module's first parameter or buffer (CPU when it has none)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _template_embeddings(self, names: list[str]) -> Tensor:
        """Prompt-ensemble embedding per name: mean over templates of unit embeddings, re-normalised (N, D)."""
        prompts = [template.format(name) for name in names for template in self.templates]
        embeddings = F.normalize(self._encode_texts(prompts).float(), dim=-1)
        return F.normalize(embeddings.view(len(names), len(self.templates), -1).mean(dim=1), dim=-1)

    @torch.no_grad()
    def encode_concepts(self, concepts: Sequence[Concept]) -> Tensor:
        """Unit text embeddings (K, D) of K concepts; each synonym is template-averaged, freed of the empty-prompt
        ("redundant") component as in CLIP Surgery, re-normalised, then synonyms are averaged. Cached per concept."""
        keys = [concept_key(concept) for concept in concepts]
        if () not in self._concept_cache:
            self._concept_cache[()] = self._template_embeddings([""])[0].cpu()
        redundant = self._concept_cache[()]
        new_names = sorted({name for key in keys if key not in self._concept_cache for name in key})
        if new_names:
            per_name = F.normalize(self._template_embeddings(new_names).cpu() - redundant, dim=-1)
            by_name = dict(zip(new_names, per_name))
            for key in keys:
                if key not in self._concept_cache:
                    self._concept_cache[key] = F.normalize(torch.stack([by_name[n] for n in key]).mean(0), dim=0)
        stacked = [self._concept_cache[key] for key in keys]
        empty = torch.empty(0, redundant.shape[-1])
        return (torch.stack(stacked) if stacked else empty).to(self.device)

    def similarity(self, text: Tensor, dense: Tensor) -> Tensor:
        """Cosine similarity (B, K, h, w) in [-1, 1] of K text embeddings (K, D) with dense features (B, D, h, w)."""
        return torch.einsum("kd,bdhw->bkhw", F.normalize(text, dim=-1), F.normalize(dense, dim=1))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the parameters that train (requires_grad); frozen encoders stay out of our checkpoints."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore what `trainable_state_dict` saved; any missing, extra or mis-shaped tensor is a WeightsError."""
        own = dict((name, p) for name, p in self.named_parameters() if p.requires_grad)
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        mismatched = [n for n in own if n in state_dict and state_dict[n].shape != own[n].shape]
        if missing or unexpected or mismatched:
            raise WeightsError(
                f"trainable state of {type(self).__name__}",
                f"does not fit (missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {mismatched[:4]})",
                "Load it into the same vision-language backbone and settings it was trained with",
            )
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state_dict[name])
