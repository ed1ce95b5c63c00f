"""The Qt drawing of a grid world (`grid.Scene`): cells, Taxi's walls, passenger and destination,
and the agent. Painted on the GUI thread in `paintEvent`; `show_scene` only stores and repaints.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from gymbus.services.viewers.grid import Scene

#: fill of each kind of cell (grid.KINDS)
CELL_COLOURS = {
    "start": "#c9d6ea", "frozen": "#d8eef7", "hole": "#1d3557", "goal": "#2a9d8f",
    "cliff": "#7f2f2f", "path": "#eceff1", "stand": "#fdf0d5",
}
LETTER_COLOURS = {"hole": "#ffffff", "goal": "#ffffff", "cliff": "#ffffff"}
AGENT = "#e63946"
TAXI_EMPTY = "#f4a261"
TAXI_FULL = "#52b788"
PASSENGER = "#1d4ed8"
DESTINATION = "#c026d3"
WALL = "#212529"


class GridWidget(QtWidgets.QWidget):
    """Paints one `Scene`, scaled to the widget; shows `message` when there is none."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.scene: Scene | None = None
        self.message = "no steps yet"
        self.setMinimumSize(160, 120)
        self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding,
                           QtWidgets.QSizePolicy.Policy.Expanding)

    def show_scene(self, scene: Scene | None, message: str = "") -> None:
        """Show `scene` (GUI thread); None shows `message` instead."""
        if scene != self.scene or message != self.message:
            self.scene = scene
            self.message = message or self.message
            self.update()

    def sizeHint(self) -> QtCore.QSize:
        return QtCore.QSize(360, 280)

    def paintEvent(self, event: QtGui.QPaintEvent) -> None:
        painter = QtGui.QPainter(self)
        painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QtGui.QColor("#ffffff"))
        scene = self.scene
        if scene is None:
            painter.setPen(QtGui.QColor("#6c757d"))
            painter.drawText(self.rect(), QtCore.Qt.AlignmentFlag.AlignCenter, self.message)
            painter.end()
            return
        size = min((self.width() - 8) / scene.cols, (self.height() - 8) / scene.rows)
        left = (self.width() - size * scene.cols) / 2
        top = (self.height() - size * scene.rows) / 2
        font = painter.font()
        font.setPixelSize(max(8, int(size * 0.35)))
        font.setBold(True)
        painter.setFont(font)
        for r in range(scene.rows):
            for c in range(scene.cols):
                self._cell(painter, scene, r, c, QtCore.QRectF(left + c * size, top + r * size,
                                                               size, size))
        pen = QtGui.QPen(QtGui.QColor(WALL), max(2.0, size / 10))
        painter.setPen(pen)
        for r, c in scene.walls:
            x = left + (c + 1) * size
            painter.drawLine(QtCore.QPointF(x, top + r * size), QtCore.QPointF(x, top + (r + 1) * size))
        painter.setBrush(QtCore.Qt.BrushStyle.NoBrush)
        painter.drawRect(QtCore.QRectF(left, top, size * scene.cols, size * scene.rows))
        self._agent(painter, scene, left, top, size)
        painter.end()

    def _cell(self, painter: QtGui.QPainter, scene: Scene, r: int, c: int,
              rect: QtCore.QRectF) -> None:
        kind = scene.kind(r, c)
        painter.setPen(QtGui.QPen(QtGui.QColor("#adb5bd"), 1))
        painter.setBrush(QtGui.QColor(CELL_COLOURS.get(kind, "#eceff1")))
        painter.drawRect(rect)
        if (r, c) == scene.destination:
            painter.setPen(QtGui.QPen(QtGui.QColor(DESTINATION), max(2.0, rect.width() / 12)))
            painter.setBrush(QtCore.Qt.BrushStyle.NoBrush)
            painter.drawRect(rect.adjusted(3, 3, -3, -3))
        letter = scene.letter(r, c)
        if letter not in (".", "F"):
            painter.setPen(QtGui.QColor(LETTER_COLOURS.get(kind, "#343a40")))
            painter.drawText(rect, QtCore.Qt.AlignmentFlag.AlignCenter, letter.upper())
        if (r, c) == scene.passenger:
            painter.setPen(QtCore.Qt.PenStyle.NoPen)
            painter.setBrush(QtGui.QColor(PASSENGER))
            d = rect.width() / 4
            painter.drawEllipse(QtCore.QRectF(rect.right() - d - 3, rect.top() + 3, d, d))

    def _agent(self, painter: QtGui.QPainter, scene: Scene, left: float, top: float,
               size: float) -> None:
        r, c = scene.agent
        rect = QtCore.QRectF(left + c * size, top + r * size, size, size).adjusted(
            size * 0.2, size * 0.2, -size * 0.2, -size * 0.2)
        painter.setPen(QtGui.QPen(QtGui.QColor(WALL), 1.5))
        if scene.family == "Taxi":
            painter.setBrush(QtGui.QColor(TAXI_FULL if scene.carrying else TAXI_EMPTY))
            painter.drawRoundedRect(rect, size * 0.1, size * 0.1)
        else:
            painter.setBrush(QtGui.QColor(AGENT))
            painter.drawEllipse(rect)
