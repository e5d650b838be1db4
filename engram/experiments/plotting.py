"""The experiments' one door to matplotlib: imported when a figure is drawn, never when a sweep module is
imported, so training and analysis run without it and a notebook's backend is left alone until then."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the figures here are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
