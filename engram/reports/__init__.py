"""Reports of trained models: the Engram-vs-matched-MoE comparison (``engram compare`` / ``engram demo``) and
its figures. The reporting layer: it sits above training, and it is where matplotlib is imported.

* :mod:`~engram.reports.compare`: :func:`compare`, :func:`demo` (train the matched pair, write the report folder).
* :mod:`~engram.reports.figures`: loss curves, the gate heatmap, the comparison table.
* :mod:`~engram.reports.profile_plot`: the rank-frequency figure of `engram profile`.
"""

from .compare import ReportError, compare, demo

__all__ = ["ReportError", "compare", "demo"]
