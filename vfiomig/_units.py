"""Units on the command line and in sink/source specs: one size parser for every option."""

from __future__ import annotations

import re

from vfiomig._core._errors import UsageError

_SIZE = re.compile(r"(?i)([0-9]+)\s*([kmgt]?)(i?b?)")


def parse_size(text: str) -> int:
    """Parse ``64MiB``, ``64M``, ``1g``, ``4096`` into bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"size {text!r} is not a number with an optional K/M/G/T unit")
    scale: int = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(m.group(1)) * scale
