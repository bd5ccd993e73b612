"""vfio-user migration data path benchmarks (see ``bench.py``)."""
