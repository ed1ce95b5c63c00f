"""The Qt viewer's comparison window: runs across seeds, a curve and a band per configuration.

What it shows is `gymbus compare`'s (gymbus.services.analysis): the IQM across seeds of each
configuration's smoothed episode returns at common environment steps, with its 95% stratified
bootstrap band, and a line per configuration with its final IQM and interval. Reading the runs
and the bootstrap run on the viewer's request thread (`Requests`), with clients of their own;
the drawing on the GUI thread.
"""

from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from gymbus.services.analysis import compare as model
from gymbus.services.ingest.client import StoreClient
from gymbus.services.viewers.qt.requests import Requests
from gymbus.shared.errors import GymbusError
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

#: a colour per configuration, in order (matplotlib's first ten, as `compare --plot` draws them)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
#: bootstrap resamples here: the window answers in about a second
REPS = 1000
REQUEST_TIMEOUT = 3.0


def compute(settings: Settings, targets: list[str]) -> dict[str, Any]:
    """The comparison of `targets` (group ids or run ids). Runs on the request thread."""
    with Client(settings.controller, "controller", REQUEST_TIMEOUT) as controller, \
            StoreClient(settings, REQUEST_TIMEOUT) as store:
        confs, _ = model.gather(controller, store, targets)
    return model.compare(confs, reps=REPS)


class CompareWindow(QtWidgets.QWidget):
    """GROUP or RUN ids in, the curves and bands of their configurations out."""

    def __init__(self, settings: Settings, requests: Requests,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent, QtCore.Qt.WindowType.Window)
        self.settings = settings
        self.requests = requests
        self.setWindowTitle("gymbus: compare runs")
        self.targets = QtWidgets.QLineEdit()
        self.targets.setPlaceholderText("a group id, or run ids separated by spaces")
        self.button = QtWidgets.QPushButton("Compare")
        self.summary = QtWidgets.QLabel("Name a group or runs, then Compare.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plot = pg.PlotWidget(background="w")
        self.plot.showGrid(x=True, y=True, alpha=0.3)
        self.plot.setLabel("bottom", "environment steps")
        self.plot.setLabel("left", "episode return (IQM across seeds)")
        for side in ("bottom", "left"):  # returns of 0..1 read as they are, not "x0.001"
            self.plot.getAxis(side).enableAutoSIPrefix(False)
        self.legend = self.plot.addLegend(offset=(10, 10), labelTextColor="k")
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.targets, 1)
        row.addWidget(self.button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot, 1)
        self.button.clicked.connect(self.compare)
        self.targets.returnPressed.connect(self.compare)
        #: the last result drawn (for tests and for a redraw)
        self.result: dict[str, Any] | None = None
        self.resize(1000, 650)

    def compare(self) -> None:
        """Ask for the comparison of what is typed (on the request thread)."""
        targets = self.targets.text().split()
        if not targets:
            self.summary.setText("Name a group id or run ids first.")
            return
        self.button.setEnabled(False)
        self.summary.setText(f"comparing {' '.join(targets)} …")

        def failed(exc: Exception) -> None:
            self.button.setEnabled(True)
            if not isinstance(exc, GymbusError):
                raise exc
            self.summary.setText(f"cannot compare: {exc}")

        self.requests.call(lambda: compute(self.settings, targets), self.show_result, failed)

    def show_result(self, result: dict[str, Any]) -> None:
        """Draw a curve and a band per configuration, and say their final IQMs (GUI thread)."""
        self.button.setEnabled(True)
        self.result = result
        self.plot.clear()
        self.legend.clear()
        lines = []
        for i, conf in enumerate(result["configurations"]):
            colour = COLOURS[i % len(COLOURS)]
            curve = conf["curve"]
            name = f"{conf['label']}: {conf['describe']} ({len(conf['runs'])} runs)"
            low = self.plot.plot(curve["steps"], curve["low"], pen=pg.mkPen(None))
            high = self.plot.plot(curve["steps"], curve["high"], pen=pg.mkPen(None))
            band = pg.FillBetweenItem(low, high, brush=pg.mkBrush(pg.mkColor(colour).red(),
                                                                  pg.mkColor(colour).green(),
                                                                  pg.mkColor(colour).blue(), 50))
            self.plot.addItem(band)
            symbol = "o" if len(curve["steps"]) == 1 else None
            self.plot.plot(curve["steps"], curve["iqm"], pen=pg.mkPen(colour, width=2),
                           symbol=symbol, symbolBrush=colour, name=name)
            iqm = conf["final"]["iqm"]
            lines.append(f"{conf['label']}  final IQM {iqm['value']:.4g} "
                         f"[{iqm['low']:.4g}, {iqm['high']:.4g}]  {conf['describe']}")
        self.summary.setText(
            f"final: mean return of each run's last {result['last']} episodes; "
            f"{result['confidence']:.0%} stratified bootstrap intervals\n" + "\n".join(lines))


def open_compare(parent: QtWidgets.QWidget, settings: Settings,
                 requests: Requests) -> CompareWindow:
    """Open (or raise) the comparison window of `parent`."""
    window: CompareWindow | None = parent.findChild(CompareWindow)
    if window is None:
        window = CompareWindow(settings, requests, parent)
    window.show()
    window.raise_()
    return window
