"""``python -m anomalib_mvfa``: the same as the ``anomalib-mvfa`` command."""

import sys

from .cli import console

sys.exit(console())
