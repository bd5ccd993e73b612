"""Fuzz targets for vfiomig's peer-facing decoders and a small engine to drive them.

``python -m fuzz --seconds 60`` fuzzes every target (coverage-guided with atheris when it is
installed, else a seeded mutation loop); ``--sanitize`` first builds the C core with
AddressSanitizer/UBSan and reruns itself with libasan preloaded. The corpus kept in the
repository is under ``fuzz/corpus/<target>/``; tests/unit/test_fuzz.py replays it and runs a
short seeded mutation pass of every target in CI. See RELIABILITY.md.
"""
