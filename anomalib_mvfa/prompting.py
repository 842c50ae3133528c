"""Prompt ensemble of MVFA.

Each state sentence ("flawless {}", "{} with defect", ...) is filled with the class
name and put into each of the 35 ImageNet-style templates. The sentences of a group
(normal or abnormal) are encoded, L2-normalised, averaged and normalised again.

Example:
    >>> from anomalib_mvfa.prompting import create_prompt_ensemble
    >>> normal, abnormal = create_prompt_ensemble("Brain")
    >>> len(normal), len(abnormal)
    (245, 175)
    >>> normal[0]
    'a bad photo of a Brain.'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F  # noqa: N812

from .errors import MvfaInputError

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# Class names the paper uses for the medical benchmark categories.
MEDICAL_CLASS_NAMES: dict[str, str] = {
    "Brain": "Brain",
    "Liver": "Liver",
    "Retina_RESC": "retinal OCT",
    "Retina_OCT2017": "retinal OCT",
    "Chest": "Chest X-ray film",
    "Histopathology": "histopathological image",
}

DEFAULT_CLASS_NAME = "object"


def prompt_class_name(category: str | None) -> str:
    """Return the class name used in prompts for a dataset category.

    Medical benchmark categories map to the paper's names; any other category is used
    as it is, with underscores turned into spaces.

    Example:
        >>> prompt_class_name("Retina_OCT2017"), prompt_class_name("metal_nut")
        ('retinal OCT', 'metal nut')
    """
    if not category:
        return DEFAULT_CLASS_NAME
    return MEDICAL_CLASS_NAMES.get(category, category.replace("_", " "))


def create_prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """Return the normal and the abnormal sentences for ``class_name``.

    Raises:
        ValueError: If ``class_name`` is empty.
    """
    if not class_name or not class_name.strip():
        msg = f"class_name must be a non-empty string, got {class_name!r}."
        raise MvfaInputError(msg)

    def sentences(states: Sequence[str]) -> list[str]:
        return [template.format(state.format(class_name)) for state in states for template in TEMPLATES]

    return sentences(NORMAL_STATES), sentences(ABNORMAL_STATES)


@torch.no_grad()
def encode_prompt_ensemble(
    class_name: str,
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Encode the prompt ensemble into the text features ``T`` of MVFA (``C x 2``).

    Column 0 is the normal group, column 1 the abnormal group; each is the normalised
    mean of the normalised sentence embeddings.

    Args:
        class_name: The object described by the prompts.
        encode_text: CLIP's text encoder (``clip.encode_text``).
        tokenizer: The tokenizer that belongs to the text encoder.
        device: Device of the encoder.

    Example:
        >>> features = encode_prompt_ensemble("Brain", clip.encode_text, tokenizer)  # doctest: +SKIP
        >>> features.shape  # doctest: +SKIP
        torch.Size([768, 2])
    """
    columns = []
    for group in create_prompt_ensemble(class_name):
        embeddings = F.normalize(encode_text(tokenizer(group).to(device)).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)
