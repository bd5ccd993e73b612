"""The installed distribution's version (``vfiomig --version``, ``vfiomig.__version__``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vfiomig")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
