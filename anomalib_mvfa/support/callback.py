"""The support set's record in Lightning checkpoints.

:class:`FewShotMemoryBankCallback` holds state only: the files a :class:`~.service.FewShotSupport`
selected travel with every checkpoint under the callback-state key ``"FewShotMemoryBankCallback"``
(as ``{"selected_files": ...}``), the key checkpoints of earlier releases carry, and come back from
them. It drives nothing: ``Mvfa`` draws, serves and builds from its support set in its own hooks.

Example:
    >>> from anomalib_mvfa.support import FewShotMemoryBankCallback, FewShotSupport, SupportSettings
    >>> callback = FewShotMemoryBankCallback(FewShotSupport(SupportSettings(k_shot=2)))
    >>> callback.state_key, callback.state_dict()
    ('FewShotMemoryBankCallback', {'selected_files': {}})
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from .service import FewShotSupport

__all__ = ["FewShotMemoryBankCallback"]


class FewShotMemoryBankCallback(Callback):
    """Keeps the selected support files of ``support`` in checkpoints (the name is the checkpoint key).

    Args:
        support: The support set whose record is saved and restored.
    """

    def __init__(self, support: FewShotSupport) -> None:
        super().__init__()
        self.support = support

    @property
    def selected_files(self) -> dict[str, list[str]]:
        """The support set's selected files: ``{"normal": [...], "abnormal": [...]}`` after a few-shot draw."""
        return self.support.selected_files

    def state_dict(self) -> dict[str, Any]:
        """The selected support files travel with the checkpoint."""
        return {"selected_files": self.support.selected_files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the record of selected support files."""
        self.support.selected_files = dict(state_dict.get("selected_files", {}))
