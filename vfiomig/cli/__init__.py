"""The ``vfiomig`` command: argparse front end (`_main`, the only place `trio.run` is
called), sink and source specs (`_specs`), and ``vfiomig demo`` (`_demo`).
May import: everything.
"""

from vfiomig._public import claim
from vfiomig.cli._main import main, run

__all__ = ["main", "run"]

claim(__name__, globals(), __all__)
