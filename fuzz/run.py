"""``fuzz/run.py --seconds N``: the same as ``python -m fuzz --seconds N``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
