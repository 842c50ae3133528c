"""MVFA for anomalib: multi-level visual feature adapters on a frozen CLIP.

Example:
    >>> from anomalib_mvfa import Mvfa, MvfaModel
    >>> model = Mvfa(backbone="ViT-L-14-336", pretrained="openai", image_size=240)  # doctest: +SKIP
    >>> torch_model = MvfaModel(backbone="ViT-L-14-336", pretrained="openai", image_size=240)  # doctest: +SKIP
"""

from .augmentation import SupportSet, augment_support_set
from .backbone import PretrainedWeightsError, load_clip
from .callback import FewShotMemoryBankCallback
from .lightning_model import Mvfa
from .loss import DetectionLoss, MvfaLoss
from .torch_model import BranchOutputs, MvfaModel, TrainingOutputs

__version__ = "0.1.0"

__all__ = [
    "BranchOutputs",
    "DetectionLoss",
    "FewShotMemoryBankCallback",
    "Mvfa",
    "MvfaLoss",
    "MvfaModel",
    "PretrainedWeightsError",
    "SupportSet",
    "TrainingOutputs",
    "augment_support_set",
    "load_clip",
]
