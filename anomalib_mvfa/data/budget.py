"""How much decoded pixel data one file may declare before the reader allocates anything for it.

Every reader of the package compares what a file declares (DICOM rows x columns x frames x
samples x bytes, NIfTI dimensions x data type, PNG/TIFF pixels x bands x bytes) with the bytes the
file holds and with :attr:`~anomalib_mvfa.data.readers.ScanReader.max_decoded_bytes` before it
lists the file's frames or slices or decodes it. A file of a few kilobytes that declares gigabytes
(a decompression bomb, a header that lies) is refused with its name instead of exhausting memory.

The default budget is :data:`DEFAULT_MEMORY_FRACTION` of the machine's physical memory: reading
converts values to float32 and holds a few copies of them (up to about 13 bytes per decoded byte of
8-bit data, measured with ``tracemalloc``), so a file at the limit needs at most about a fifth of
the memory.

Example:
    >>> from anomalib_mvfa.data.budget import check_budget
    >>> check_budget("scan.dcm", "DICOM", "512 x 512 pixels x 2 bytes", 512 * 512 * 2, 2**30)
"""

from __future__ import annotations

import os

from ..errors import MvfaInputError

# The default budget: this fraction of the physical memory (a read holds up to ~13 bytes per decoded byte)
DEFAULT_MEMORY_FRACTION = 1 / 64
# Used where the physical memory cannot be told (a platform without os.sysconf's page counts)
FALLBACK_MAX_DECODED_BYTES = 2**30


def physical_memory() -> int | None:
    """Bytes of physical memory, from ``psutil`` if installed, else ``os.sysconf``; ``None`` if neither tells."""
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def default_max_decoded_bytes() -> int:
    """:data:`DEFAULT_MEMORY_FRACTION` of the physical memory (1 GiB where it cannot be told).

    Example:
        >>> default_max_decoded_bytes() > 0
        True
    """
    memory = physical_memory()
    return int(memory * DEFAULT_MEMORY_FRACTION) if memory else FALLBACK_MAX_DECODED_BYTES


def human_bytes(count: float) -> str:
    """``1536`` as ``"1.5 KiB"``: a size for messages.

    Example:
        >>> human_bytes(3 * 2**30)
        '3.0 GiB'
    """
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"  # pragma: no cover - the loop returns


def check_budget(path: object, kind: str, layout: str, declared: int, budget: int | None) -> None:
    """Refuse a file whose declared decoded size is above ``budget``, naming it, its size and the setting.

    Args:
        path: The file, for the message.
        kind: ``"DICOM"``, ``"NIfTI"`` or ``"Image"``.
        layout: What it declares, in words (``"60000 x 60000 pixels x 1 frame(s) x 2 bytes"``).
        declared: The declared decoded size in bytes.
        budget: The reader's ``max_decoded_bytes``; :func:`default_max_decoded_bytes` when ``None``.

    Raises:
        MvfaInputError: If ``declared > budget``.
    """
    budget = default_max_decoded_bytes() if budget is None else budget
    if declared > budget:
        msg = (
            f"{kind} '{path}' declares {layout} = {human_bytes(declared)} of decoded pixel data, more than the "
            f"reader's max_decoded_bytes={budget} ({human_bytes(budget)}); raise it with "
            "ScanReader(max_decoded_bytes=...) or --data.reader.max_decoded_bytes if the file is genuine."
        )
        raise MvfaInputError(msg)


def check_held(path: object, kind: str, layout: str, declared: int, held: int) -> None:
    """Refuse a file that declares more uncompressed data than it holds (a truncated file or a lying header).

    Raises:
        MvfaInputError: If ``declared > held``.
    """
    if declared > held:
        msg = (
            f"{kind} '{path}' declares {layout} = {declared} bytes of pixel data but holds {held}: "
            "the file is truncated or its header is wrong."
        )
        raise MvfaInputError(msg)
