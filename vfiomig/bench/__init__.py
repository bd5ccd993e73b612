"""``vfiomig bench``: how many channels and which packet size, measured on this machine.

Modules: `_plan` (the scenarios' defaults, the matrix, the models in words), `_command`
(the bench itself: runs, repeats, output), `_runner` (one run of a cell), `_cref` (the C
reference's runs), `_cpu` (CPU per process during a run), `_precopy` (downtime with
PRE_COPY next to without), `_model` (device and config models, lower bound), `_sinks`
(sink models), `_seq` (the vhost-user style sequential baseline), `_sendproc` (the sender
process), `_report` (statistics, table, CSV, JSON), `_advice` (how many channels, with
statistics), `_verdict` (the QEMU table), `_plots` (PNG, optional). Its options are the
command line's (`vfiomig.cli._bench`).
"""

from __future__ import annotations

from vfiomig._public import claim

from ._command import bench_main
from ._model import Bound, ConfigModel, DeviceModelSink, Overhead, lower_bound
from ._runner import Case, Models, Run

__all__ = [
    "Bound",
    "Case",
    "ConfigModel",
    "DeviceModelSink",
    "Models",
    "Overhead",
    "Run",
    "bench_main",
    "lower_bound",
]

claim(__name__, globals(), __all__)
