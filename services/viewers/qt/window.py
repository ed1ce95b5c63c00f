"""`gymbus viewer`: the desktop viewer (PySide6, pyqtgraph), an optional extra (`gymbus[qt]`).

A tab per agent, opened when its first live frame arrives (or from the runs panel); a runs panel
to submit (a form), cancel and see states. Threads: the GUI thread draws and holds the model;
the `LiveFeed`'s receiver thread fills its queue, which a 50 ms timer drains; the request thread
(`Requests`) asks the controller and the ingest, or reads the store when they do not answer,
and hands what it got back to the GUI thread: a 1 s timer starts such a refresh when none is in
flight, and submit, cancel and replay go the same way. A service that does not answer never
stalls the window.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

from PySide6 import QtCore, QtWidgets

from gymbus.services.viewers.live import VIEWER_TIMEOUT, Live
from gymbus.services.viewers.live_runs import RunView, short_id
from gymbus.services.viewers.qt.collector import MainThreadCollector
from gymbus.services.viewers.qt.compare import open_compare
from gymbus.services.viewers.qt.preflight import bindings_broken, check_bindings, check_display
from gymbus.services.viewers.qt.requests import Requests
from gymbus.services.viewers.qt.submit import SubmitDialog
from gymbus.services.viewers.qt.tab import AgentTab
from gymbus.services.viewers.reader import Status, Stored
from gymbus.shared.errors import GymbusError, RemoteError
from gymbus.shared.protocol import Command
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

__all__ = ["RUN_COLUMNS", "MainWindow", "RunsPanel", "SubmitDialog", "bindings_broken", "main"]

POLL_MS = 50
REFRESH_MS = 1000
REQUEST_TIMEOUT = 3.0
#: the runs panel's columns: what tells runs apart and how far they are first
RUN_COLUMNS = ("run", "state", "episodes", "name", "tags", "env", "algo", "mode", "missed")
#: the columns shown only where a run has something in them
OPTIONAL_RUN_COLUMNS = ("name", "tags")
#: the most of the window's width the runs panel takes at first to show its columns whole
RUNS_PANEL_SHARE = 0.5
#: what the tab area says while no tab is open
NO_TAB = ("No run is open. A run's tab opens when its first live frame arrives; to look at a "
          "finished one, double-click it in the list (or select it and press Open). Submit… "
          "starts a new run.")


class RunsPanel(QtWidgets.QWidget):
    """Runs with their states; Submit, Cancel, Open (a tab for the selected run)."""

    #: a run was submitted: its id
    submitted = QtCore.Signal(str)

    def __init__(self, window: MainWindow) -> None:
        super().__init__()
        self.window_ = window
        self.table = QtWidgets.QTableWidget(0, len(RUN_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(RUN_COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.submit_button = QtWidgets.QPushButton("Submit…")
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.open_button = QtWidgets.QPushButton("Open")
        buttons = QtWidgets.QHBoxLayout()
        for button in (self.submit_button, self.cancel_button, self.open_button):
            buttons.addWidget(button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.table)
        self.submit_button.clicked.connect(self.ask_and_submit)
        self.cancel_button.clicked.connect(lambda: self.cancel(self.selected()))
        self.open_button.clicked.connect(lambda: self.open(self.selected()))
        self.table.cellDoubleClicked.connect(lambda row, col: self.open(self.selected()))

    def selected(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        item = self.table.item(rows[0].row(), 0) if rows else None
        return item.data(QtCore.Qt.ItemDataRole.UserRole) if item else None

    def show_runs(self, views: Sequence[RunView]) -> None:
        selected = self.selected()
        self.table.setRowCount(len(views))
        for row, v in enumerate(views):
            state = v.status if v.status and v.state in ("", "running") else v.state or "?"
            for col, text in enumerate((short_id(v.run_id, 10), state, str(v.episodes), v.name,
                                        v.tags_text(), v.env, v.algo, v.telemetry,
                                        str(v.seqs.missed))):
                item = QtWidgets.QTableWidgetItem(text)
                if RUN_COLUMNS[col] in ("episodes", "missed"):
                    item.setTextAlignment(QtCore.Qt.AlignmentFlag.AlignRight
                                          | QtCore.Qt.AlignmentFlag.AlignVCenter)
                item.setData(QtCore.Qt.ItemDataRole.UserRole, v.run_id)
                item.setToolTip(v.run_id)
                self.table.setItem(row, col, item)
            if v.run_id == selected:
                self.table.selectRow(row)
        for name in OPTIONAL_RUN_COLUMNS:
            col = RUN_COLUMNS.index(name)
            self.table.setColumnHidden(col, not any(
                (cell := self.table.item(row, col)) is not None and cell.text()
                for row in range(len(views))))
        self.table.resizeColumnsToContents()

    def wanted_width(self) -> int:
        """The width that shows every column of the table whole, without scrolling."""
        table = self.table
        columns = sum(table.columnWidth(c) for c in range(table.columnCount())
                      if not table.isColumnHidden(c))
        layout = self.layout()
        margins = layout.contentsMargins() if layout is not None else QtCore.QMargins()
        return (columns + 2 * table.frameWidth() + table.verticalScrollBar().sizeHint().width()
                + margins.left() + margins.right())

    def ask_and_submit(self) -> None:
        """The form; what it accepts is submitted, and a refusal opens it again, saying why."""
        dialog = SubmitDialog(self)
        dialog.accepted.connect(lambda: self.submit(dialog.config(), dialog))
        dialog.open()

    def submit(self, config: dict[str, Any], dialog: SubmitDialog | None = None) -> None:
        """Submit a run config to the controller (on the request thread); `submitted` gives its
        run id, the status bar a refusal (and the form, open again, the field it names)."""
        controller = self.window_.controller
        body = {"config": config, "idempotency_key": ""}

        def submitted(reply: dict[str, Any]) -> None:
            run_id: str = reply["run_id"]
            self.window_.say(f"submitted {run_id}")
            self.window_.live.view(run_id).set_record(reply["run"])
            if dialog is not None:
                dialog.deleteLater()
            self.submitted.emit(run_id)

        def refused(exc: Exception) -> None:
            if not isinstance(exc, GymbusError):
                raise exc
            self.window_.say(f"submit refused: {exc}")
            if dialog is not None:
                field = exc.field if isinstance(exc, RemoteError) else None
                dialog.show_error(field, str(exc).removeprefix(f"{field}: "))
                dialog.open()

        self.window_.requests.call(lambda: controller.request(Command.SUBMIT, body), submitted,
                                   refused)

    def cancel(self, run_id: str | None) -> None:
        """Ask the controller to cancel the run (on the request thread)."""
        if run_id is None:
            self.window_.say("select a run to cancel")
            return
        controller = self.window_.controller

        def cancelled(reply: dict[str, Any]) -> None:
            self.window_.live.view(run_id).set_record(reply["run"])
            self.window_.say(f"cancelling {run_id}: {reply['run']['state']}")

        def refused(exc: Exception) -> None:
            if not isinstance(exc, GymbusError):
                raise exc
            self.window_.say(f"cannot cancel {run_id}: {exc}")

        self.window_.requests.call(
            lambda: controller.request(Command.CANCEL, {"run_id": run_id}), cancelled, refused)

    def open(self, run_id: str | None) -> None:
        if run_id is not None:
            self.window_.tabs.setCurrentWidget(self.window_.open_tab(run_id))


class MainWindow(QtWidgets.QMainWindow):
    """The viewer: the runs panel on the left, a tab per agent on the right."""

    def __init__(self, settings: Settings, run_ids: Sequence[str] = (),
                 live: Live | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.setWindowTitle("gymbus viewer")
        #: garbage collection on this (the GUI) thread only, while the window is open
        self.collector = MainThreadCollector(self)
        self.live = live or Live(settings, run_ids,
                                 timeout=min(VIEWER_TIMEOUT, settings.request_timeout))
        self.named = list(run_ids)
        self.requests = Requests()
        #: used on the request thread only (submit, cancel), like the live model's reader
        self.controller = Client(settings.controller, "controller", REQUEST_TIMEOUT)
        #: a refresh is in flight (its requests on the request thread)
        self.refreshing = False
        self.agent_tabs: dict[tuple[str, str], AgentTab] = {}
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.setTabsClosable(True)
        self.tabs.tabCloseRequested.connect(self.close_tab)
        self.no_tab = QtWidgets.QLabel(NO_TAB)
        self.no_tab.setWordWrap(True)
        self.no_tab.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.no_tab.setMargin(40)
        self.no_tab.setStyleSheet("color: #6c757d")
        self.tab_area = QtWidgets.QStackedWidget()
        self.tab_area.addWidget(self.no_tab)
        self.tab_area.addWidget(self.tabs)
        self.runs_panel = RunsPanel(self)
        self.splitter = splitter = QtWidgets.QSplitter()
        splitter.addWidget(self.runs_panel)
        splitter.addWidget(self.tab_area)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([380, 900])
        #: whether the runs panel is given the width of its columns as they grow (until the user
        #: moves the splitter: then its width is theirs)
        self.fit_panel = True
        splitter.splitterMoved.connect(self._splitter_moved)
        self.setCentralWidget(splitter)
        self.accounting = QtWidgets.QLabel("asking the services…")
        self.statusBar().addPermanentWidget(self.accounting)
        self.poll_timer = QtCore.QTimer(self)
        self.poll_timer.setInterval(POLL_MS)
        self.poll_timer.timeout.connect(self.on_poll)
        self.refresh_timer = QtCore.QTimer(self)
        self.refresh_timer.setInterval(REFRESH_MS)
        self.refresh_timer.timeout.connect(self.on_refresh)
        self.menuBar().addAction("Compare runs…",
                                 lambda: open_compare(self, self.settings, self.requests))
        self.resize(1280, 800)

    def start(self) -> None:
        """Subscribe, open the named runs' tabs, start the timers and the first refresh (GUI
        thread; the snapshot comes with that refresh, so that nothing falls between the two)."""
        self.live.start(refresh=False)
        for run_id in self.named:
            self.open_tab(run_id)
        self.on_refresh()
        self.poll_timer.start()
        self.refresh_timer.start()

    def _splitter_moved(self, pos: int, index: int) -> None:
        self.fit_panel = False

    def say(self, message: str) -> None:
        self.statusBar().showMessage(message, 10_000)

    def tab_for(self, run_id: str) -> AgentTab | None:
        return next((t for (r, _), t in self.agent_tabs.items() if r == run_id), None)

    def open_tab(self, run_id: str, agent_id: str = "") -> AgentTab:
        """The tab of the run's agent, created if it is not open."""
        view = self.live.view(run_id)
        key = (run_id, agent_id or view.agent_id or "agent")
        tab = self.agent_tabs.get(key) or self.tab_for(run_id)
        if tab is None:
            tab = self.agent_tabs[key] = AgentTab(view, self.settings, self.requests,
                                                  self.ask_ingest)
            self.tabs.addTab(tab, f"{key[1]} · {run_id[-6:]}")
            self.tabs.setTabToolTip(self.tabs.indexOf(tab), f"{key[1]} of run {run_id}")
            self.tab_area.setCurrentWidget(self.tabs)
        return tab

    def ask_ingest(self) -> bool:
        """Whether reads ask the ingest first: unless the last refresh found it down."""
        return self.live.ingest_ok or not self.live.asked

    def close_tab(self, index: int) -> None:
        widget = self.tabs.widget(index)
        self.tabs.removeTab(index)
        self.agent_tabs = {k: t for k, t in self.agent_tabs.items() if t is not widget}
        if not self.agent_tabs:
            self.tab_area.setCurrentWidget(self.no_tab)

    def on_poll(self) -> None:
        """Drain the live feed; a run's first frame opens its agent's tab (GUI thread)."""
        frames = self.live.poll()
        touched = {(f.run_id, f.agent_id) for f in frames}
        for run_id, agent_id in touched:
            self.open_tab(run_id, agent_id).update_view()

    # --- a refresh: status, then what is due from the store, each on the request thread ---------

    def on_refresh(self) -> None:
        """Start a refresh unless one is in flight (GUI thread)."""
        if self.refreshing:
            return
        self.refreshing = True
        self.requests.call(self.live.reader.status, self._got_status, self._refresh_failed)

    def _got_status(self, status: Status) -> None:
        self.live.apply_status(status)
        self.redraw()
        fetches = self.live.due()
        if not fetches:
            self.refreshing = False
            return
        reader = self.live.reader
        self.requests.call(lambda: reader.read(fetches), self._got_stored, self._refresh_failed)

    def _got_stored(self, stored: list[Stored]) -> None:
        self.refreshing = False
        if self.live.apply_stored(stored):
            self.redraw()

    def _refresh_failed(self, exc: Exception) -> None:
        self.refreshing = False
        if not isinstance(exc, GymbusError):
            raise exc
        self.say(f"cannot refresh: {exc}")

    def redraw(self) -> None:
        """Every tab, the runs panel and the accounting, from the live model (GUI thread)."""
        order = {run_id: i for i, run_id in enumerate(self.live.order)}
        views = sorted(self.live.runs.values(), key=lambda v: order.get(v.run_id, len(order)))
        self.runs_panel.show_runs(views)
        if views and self.fit_panel:
            sizes = self.splitter.sizes()
            total = sum(sizes)
            left = max(380, min(self.runs_panel.wanted_width(), int(total * RUNS_PANEL_SHARE)))
            if left > sizes[0]:
                self.splitter.blockSignals(True)  # not the user's move
                self.splitter.setSizes([left, total - left])
                self.splitter.blockSignals(False)
        for (run_id, agent), tab in self.agent_tabs.items():
            tab.update_view()
            agent = tab.view.agent_id or agent  # a tab opened before the run's first frame
            self.tabs.setTabText(self.tabs.indexOf(tab), f"{agent} · {run_id[-6:]}")
        t = self.live.totals()
        self.accounting.setText(
            f"controller {'ok' if self.live.controller_ok else 'down'} · ingest "
            f"{'ok' if self.live.ingest_ok else 'down (reading the file)'} · live frames "
            f"{t['live']} · missed {t['missed']} (dropped here {t['dropped']}) · from store "
            f"{t['from_store']}")

    def closeEvent(self, event: Any) -> None:
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the timers, the request thread (closing its sockets there) and the feed;
        idempotent."""
        self.poll_timer.stop()
        self.refresh_timer.stop()
        self.requests.close(last=self._close_clients)
        self.live.feed.close()
        self.collector.stop()

    def _close_clients(self) -> None:
        """On the request thread, where they were used."""
        self.live.reader.close()
        self.controller.close()


def main(settings: Settings, run_ids: Sequence[str] = ()) -> int:
    """Run the viewer until its window closes; the exit code."""
    check_display()
    check_bindings()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    window = MainWindow(settings, run_ids)
    window.start()
    window.show()
    try:
        return int(app.exec())
    finally:
        window.shutdown()
