"""The errors anomalib-mvfa raises for bad input.

Everything the package raises because of what it was given (an argument, a file, a folder, a
checkpoint) is an :class:`MvfaInputError`, a ``ValueError``: the ``anomalib-mvfa`` command line
prints it in one line. Any other exception is a bug and is shown with its traceback.

Example:
    >>> from anomalib_mvfa.errors import MvfaInputError
    >>> try:
    ...     raise MvfaInputError("k_shot must be >= 0, got -1.")
    ... except ValueError as error:
    ...     print(error)
    k_shot must be >= 0, got -1.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MvfaFileNotFoundError", "MvfaInputError", "MvfaTrainingDivergedError", "medical_extra"]

MEDICAL_INSTALL_HINT = "pip install 'anomalib-mvfa[medical]'"


class MvfaInputError(ValueError):
    """Bad input: an argument, a file, a folder or a checkpoint that the package cannot use as given."""


class MvfaFileNotFoundError(MvfaInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MvfaTrainingDivergedError(MvfaInputError, FloatingPointError):
    """The training loss became NaN or infinite: the settings or the images do not suit each other."""


def medical_extra(module: str, purpose: str) -> ModuleType:
    """Import ``module``, a dependency of the ``[medical]`` extra; missing, an ImportError says what needs it.

    Example:
        >>> medical_extra("json", "Reading reports").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        msg = f"{purpose} needs {module}: {MEDICAL_INSTALL_HINT}."
        raise ImportError(msg) from error
