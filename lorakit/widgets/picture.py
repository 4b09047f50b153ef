"""Static pictures of the notebooks' controls, for readers without a kernel: the base class of every control.

A live ipywidget is stored in a notebook as a ``widget-view`` reference that only a running
kernel can fill: the book, GitHub and a reopened notebook see nothing. A :class:`PicturedControl`
therefore displays *one* output holding both the live widget and a PNG of its current state.
JupyterLab shows the widget; the book (``nb_mime_priority_overrides`` in ``book/_config.yml``
ranks PNG above the widget view) and any viewer without a kernel show the picture.

The picture is a plain matplotlib figure drawn by a lorakit function from the control's
settings and result, so it is tested without a browser, and the browser tests compare the
image JupyterLab shows with :func:`figure_png` of the same settings, byte for byte.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PNG_DPI = 80  # keeps notebooks small (< 3 MB) and the pictures legible


def default_style():
    """Draw inside ``with default_style():`` so the notebook's rcParams (the inline backend's)
    do not leak in: the same settings then give the same PNG in the kernel and in a test process."""
    return matplotlib.style.context("default")


def new_figure(width: float = 9.0, height: float = 3.2) -> Figure:
    """A figure outside pyplot, so the inline backend does not show it a second time; call it
    (and draw on it) inside :func:`default_style`."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = PNG_DPI) -> bytes:
    """PNG bytes of ``fig``; the same figure gives the same bytes (no timestamp or version metadata)."""
    buffer = io.BytesIO()
    with default_style():
        fig.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


def text_figure(text: str, title: str | None = None, width: float = 9.0) -> Figure:
    """A figure that shows ``text`` (monospace, one line per line): the picture of a text-only control."""
    lines = text.splitlines() or [""]
    with default_style():
        fig = new_figure(width, 0.45 + 0.2 * (len(lines) + (title is not None)))
        if title is not None:
            fig.suptitle(title, fontsize=10, x=0.01, ha="left")
        fig.text(
            0.01, 0.95 if title is None else 0.8, "\n".join(lines), family="monospace", fontsize=9, va="top", ha="left"
        )
    return fig


class PicturedControl:
    """Base class of lorakit's controls: a live ipywidget plus a picture of its current state.

    Subclasses set ``self.widget`` (the ipywidget to show) and implement :meth:`figure` (the
    current settings and result as a matplotlib figure). Displayed, the object sends one mime
    bundle with the widget view *and* ``image/png``: JupyterLab renders the live widget, a viewer
    without a kernel (the book) the picture of the state it had when the cell ran.
    """

    widget: Any

    def figure(self) -> Figure:
        raise NotImplementedError(f"{type(self).__name__} must implement figure()")

    def png(self) -> bytes:
        """The current state as PNG bytes (what the book shows)."""
        return figure_png(self.figure())

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        data = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
        data["image/png"] = base64.b64encode(self.png()).decode("ascii")
        return data


class Pictured(PicturedControl):
    """Any ipywidget, with a function that draws its state: ``Pictured(box, lambda: text_figure(str(result)))``."""

    def __init__(self, widget: Any, figure: Callable[[], Figure]):
        self.widget = widget
        self._figure = figure

    def figure(self) -> Figure:
        return self._figure()
