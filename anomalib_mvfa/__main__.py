"""``python -m anomalib_mvfa``: the same as the ``anomalib-mvfa`` command.

Example:
    python -m anomalib_mvfa configs --dest .
"""

import sys

from .commands import console

if __name__ == "__main__":
    sys.exit(console())
