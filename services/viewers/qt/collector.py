"""Python's cyclic garbage collection on the GUI thread only, while a viewer window is open.

The viewer's request and stats threads allocate (decoding replies), and an automatic collection
runs on whichever thread allocates when a threshold is passed. A cycle holding a Qt object,
collected on such a thread, runs the C++ destructor there: it takes Qt's lock for the object's
connections, then waits for the GIL to call a Python override; meanwhile the GUI thread, holding
the GIL, deletes another Qt object and waits for that lock. Both wait for good (seen in the
viewer's tests as a hang in `QObject::~QObject`). So automatic collection is switched off while a
window is open, and a timer on the GUI thread collects instead, by the same thresholds.
"""

from __future__ import annotations

import gc

from PySide6 import QtCore

#: how often the GUI thread looks at the collector's counts
COLLECT_MS = 100

_open = 0  # collectors running (one per window); automatic collection is off while any is
_was_enabled = True


class MainThreadCollector(QtCore.QObject):
    """Switches automatic collection off and collects on a GUI-thread timer; `stop` undoes it
    (automatic collection is back once every collector has stopped). Idempotent."""

    def __init__(self, parent: QtCore.QObject | None = None, interval_ms: int = COLLECT_MS) -> None:
        super().__init__(parent)
        global _open, _was_enabled
        if _open == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _open += 1
        self._running = True
        self.collections = 0
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.collect)
        self.timer.start()

    def collect(self) -> int:
        """The generation an automatic collection would take now (-1: none), collected."""
        counts, thresholds = gc.get_count(), gc.get_threshold()
        generation = -1
        for g in range(3):
            if thresholds[g] and counts[g] > thresholds[g]:
                generation = g
        if generation >= 0:
            gc.collect(generation)
            self.collections += 1
        return generation

    def stop(self) -> None:
        global _open
        if not self._running:
            return
        self._running = False
        self.timer.stop()
        _open -= 1
        if _open == 0 and _was_enabled:
            gc.enable()
