"""One colour per stream in every plot of a report, a comparison and a training history.

A reader follows a stream from plot to plot by its colour, so every plotting function asks
:func:`stream_color` instead of keeping its own palette (issue 21: the fused stream was purple in
one plot and green in the others). The values are matplotlib's tab10 colours.
"""

from __future__ import annotations

__all__ = ["STREAM_COLORS", "stream_color"]

STREAM_COLORS = {
    "rgb": "#d62728",  # tab:red
    "depth": "#1f77b4",  # tab:blue
    "thermal": "#ff7f0e",  # tab:orange
    "hha": "#8c564b",  # tab:brown
    "fused": "#9467bd",  # tab:purple
    "decoder": "#7f7f7f",  # tab:gray
    "head": "#17becf",  # tab:cyan
}
_SPARE = ("#2ca02c", "#e377c2", "#bcbd22", "#393b79", "#637939")  # tab:green, pink, olive, ...


def stream_color(stream: str, i: int = 0) -> str:
    """The colour of ``stream`` (a modality, ``fused``, ``decoder`` or ``head``); a stream without
    one of its own (a new modality) gets the ``i``-th spare colour, none of which a named stream uses."""
    return STREAM_COLORS.get(stream, _SPARE[i % len(_SPARE)])
