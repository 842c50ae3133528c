"""MVFA's few-shot support set, in one place.

- :mod:`.selection`: settings, sources (training split, folders, synthetic, validation) and seeded draws;
- :mod:`.augmentation`: MVFA's 11 variants of every support image;
- :mod:`.datasets`: what the fit loop iterates over (:class:`TrainingSet`);
- :mod:`.service`: :class:`FewShotSupport`, the support set of one model: drawn, served and handed
  over for the memory banks, from the model's own hooks (it never calls the model);
- :mod:`.callback`: :class:`FewShotMemoryBankCallback`, which keeps the selected files in checkpoints.

Example:
    >>> from anomalib_mvfa.support import SupportSettings, draw_normal
    >>> normal = draw_normal(SupportSettings(k_shot=4, few_shot_source="scans/normal"), None)  # doctest: +SKIP
    >>> normal.images.shape  # doctest: +SKIP
    torch.Size([4, 3, 240, 240])
"""

from .augmentation import SupportSet, augment_support_set
from .callback import FewShotMemoryBankCallback
from .datasets import (
    EpochShuffleSampler,
    LabelledDataset,
    SupportBatch,
    SupportDataset,
    TrainingSet,
    support_training_set,
    zero_shot_training_set,
)
from .selection import (
    ABNORMAL_SOURCES,
    SupportImages,
    SupportSettings,
    draw_abnormal,
    draw_from_dataset,
    draw_from_folder,
    draw_normal,
    resize_image,
    resize_mask,
    synthesize_abnormal,
)
from .service import ADAPTER_FILE, SUPPORT_RECORD, FewShotSupport

__all__ = [
    "ABNORMAL_SOURCES",
    "ADAPTER_FILE",
    "SUPPORT_RECORD",
    "EpochShuffleSampler",
    "FewShotMemoryBankCallback",
    "FewShotSupport",
    "LabelledDataset",
    "SupportBatch",
    "SupportDataset",
    "SupportImages",
    "SupportSet",
    "SupportSettings",
    "TrainingSet",
    "augment_support_set",
    "draw_abnormal",
    "draw_from_dataset",
    "draw_from_folder",
    "draw_normal",
    "resize_image",
    "resize_mask",
    "support_training_set",
    "synthesize_abnormal",
    "zero_shot_training_set",
]
