"""How every table of the reports writes a number: one unit per metric kind, a fixed number of significant digits.

- AUROC, AUPRO, Dice, F1 and AP (and the ``AC`` / ``AS`` columns, which are AUROCs) are shown in
  percent, whatever table they are in; :func:`column_unit` says which columns these are, from their name;
- every number has :data:`SIGNIFICANT_DIGITS` significant digits (:func:`format_number`), a
  standard deviation as many decimals as its mean (:func:`format_stat`);
- a cell that does not apply (no masks, no seeds) is ``-`` (:data:`NOT_APPLICABLE`).

Example:
    >>> format_cell("image_AUROC", Stat(0.91234, 0.0123))
    '91.2 ± 1.2'
    >>> format_cell("images_per_second", 1033.2)
    '1033'
    >>> format_cell("Dice", None)
    '-'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SIGNIFICANT_DIGITS = 3
NOT_APPLICABLE = "-"
PERCENT = "%"
# column name words of metrics in [0, 1], shown in percent; AC and AS are the evaluation's image and pixel AUROC
PERCENT_WORDS = frozenset({"AUROC", "AUPRO", "Dice", "F1Score", "F1", "AP", "AC", "AS"})


@dataclass(frozen=True)
class Stat:
    """A figure over seeds: the mean and the sample standard deviation (``None`` with one seed).

    For a percent column (:func:`column_unit`) both are fractions in [0, 1], unless ``percent`` says they are
    already in percent.

    Example:
        >>> format_cell("ours AC", Stat(91.25, 1.5, percent=True))
        '91.2 ± 1.5'
    """

    mean: float
    std: float | None = None
    percent: bool = False


def column_unit(column: str) -> str:
    """``"%"`` for a column of a metric in [0, 1] (AUROC, AUPRO, Dice, F1, AP, AC, AS), else ``""``.

    Example:
        >>> column_unit("pixel_AUROC"), column_unit("ours AS"), column_unit("fit_seconds")
        ('%', '%', '')
    """
    words = re.split(r"[\s_]+", str(column))
    return PERCENT if PERCENT_WORDS.intersection(words) else ""


def column_label(column: str) -> str:
    """The heading of a column: its name with its unit, ``"pixel_AUROC (%)"``.

    Example:
        >>> column_label("pixel_AUROC"), column_label("seed")
        ('pixel_AUROC (%)', 'seed')
    """
    unit = column_unit(column)
    return f"{column} ({unit})" if unit else str(column)


def decimals_for(value: float, digits: int = SIGNIFICANT_DIGITS) -> int:
    """The decimals that give ``value`` ``digits`` significant digits (0 for numbers of that many digits or more).

    Example:
        >>> decimals_for(0.007919), decimals_for(91.2), decimals_for(1033.0)
        (5, 1, 0)
    """
    value = abs(float(value))
    if value == 0 or not math.isfinite(value):
        return digits - 1
    rounded = float(f"{value:.{digits}g}")  # 99.96 rounds to 100: two decimals would show "100.0"
    return max(0, digits - 1 - math.floor(math.log10(rounded)))


def format_number(value: float, digits: int = SIGNIFICANT_DIGITS) -> str:
    """``value`` with ``digits`` significant digits, in plain notation from 1e-4 to 1e9 (whole numbers kept whole).

    Example:
        >>> format_number(0.007919), format_number(91.2345), format_number(1033.4), format_number(2.5e-7)
        ('0.00792', '91.2', '1033', '2.50e-07')
    """
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and not 1e-4 <= abs(value) < 1e9:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{decimals_for(value, digits)}f}"


def format_stat(mean: float, std: float | None, digits: int = SIGNIFICANT_DIGITS) -> str:
    """``"mean ± std"``, the std to as many decimals as the mean; the mean alone without a std.

    Example:
        >>> format_stat(0.007919, 0.00504), format_stat(1033.2, 0.343), format_stat(100.0, 0.0)
        ('0.00792 ± 0.00504', '1033 ± 0', '100 ± 0')
    """
    text = format_number(mean, digits)
    if std is None or not math.isfinite(float(std)):
        return text
    if "e" in text:
        return f"{text} ± {float(std):.{digits - 1}e}"
    return f"{text} ± {float(std):.{decimals_for(mean, digits)}f}"


def format_cell(column: str, value: object) -> str:
    """A table cell's text: numbers of percent columns in percent, :data:`NOT_APPLICABLE` for ``None``.

    Example:
        >>> format_cell("AUPRO", 0.2189), format_cell("seed", 3), format_cell("category", "Brain")
        ('21.9', '3', 'Brain')
    """
    if value is None:
        return NOT_APPLICABLE
    scale = 100.0 if column_unit(column) == PERCENT else 1.0
    if isinstance(value, Stat):
        scale = 1.0 if value.percent else scale
        return format_stat(value.mean * scale, None if value.std is None else value.std * scale)
    if not is_number(value):
        return str(bool(value)) if isinstance(value, bool | np.bool_) else str(value)
    if isinstance(value, int | np.integer) and scale == 1.0:
        return str(int(value))
    return NOT_APPLICABLE if math.isnan(float(value)) else format_number(float(value) * scale)


def is_number(value: object) -> bool:
    """Whether a cell holds a number (right-aligned)."""
    return isinstance(value, Stat | float | int | np.floating | np.integer) and not isinstance(value, bool | np.bool_)
