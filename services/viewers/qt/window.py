"""`gymbus viewer`: the desktop viewer (PySide6, pyqtgraph), an optional extra (`gymbus[qt]`).

A tab per agent, opened when its first live frame arrives (or from the runs panel); a runs panel
to submit (a small form), cancel and see states. Threads: the GUI thread does everything except
the `LiveFeed`'s receiver thread; a 50 ms timer drains the feed, a 1 s timer refreshes run
states and the ingest's accounting. Requests to the services are short and bounded (2-3 s).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

from PySide6 import QtCore, QtWidgets

from gymbus.services.controller.validation import check_environment
from gymbus.services.viewers.live import Live
from gymbus.services.viewers.live_runs import RunView
from gymbus.services.viewers.qt.tab import AgentTab
from gymbus.shared.errors import GymbusError
from gymbus.shared.protocol import Command, TelemetryMode
from gymbus.shared.runconfig import ALGO_PARAMS, parse_config
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

POLL_MS = 50
REFRESH_MS = 1000
REQUEST_TIMEOUT = 3.0
ENVIRONMENTS = ("FrozenLake-v1", "FrozenLake8x8-v1", "Taxi-v4", "CliffWalking-v1", "CartPole-v1")
RUN_COLUMNS = ("run", "env", "algo", "mode", "state", "episodes", "missed")


class SubmitDialog(QtWidgets.QDialog):
    """A small form for a run config; `config()` is what it submits."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Submit a run")
        self.env = QtWidgets.QComboBox()
        self.env.setEditable(True)
        self.env.addItems(ENVIRONMENTS)
        self.algo = QtWidgets.QComboBox()
        self.algo.addItems(list(ALGO_PARAMS))
        self.episodes = QtWidgets.QSpinBox()
        self.episodes.setRange(1, 10_000_000)
        self.episodes.setValue(500)
        self.seed = QtWidgets.QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.telemetry = QtWidgets.QComboBox()
        self.telemetry.addItems([m.value for m in TelemetryMode])
        self.every = QtWidgets.QSpinBox()
        self.every.setRange(1, 1_000_000)
        self.every.setValue(10)
        self.agent_id = QtWidgets.QLineEdit("agent-0")
        self.name = QtWidgets.QLineEdit()
        self.error = QtWidgets.QLabel("")
        self.error.setStyleSheet("color: #c0392b")
        form = QtWidgets.QFormLayout(self)
        for label, widget in (("environment", self.env), ("algorithm", self.algo),
                              ("episodes", self.episodes), ("seed", self.seed),
                              ("telemetry", self.telemetry), ("every (sampled)", self.every),
                              ("agent id", self.agent_id), ("name", self.name)):
            form.addRow(label, widget)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                             | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.check_and_accept)
        buttons.rejected.connect(self.reject)
        form.addRow(self.error)
        form.addRow(buttons)

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "env": self.env.currentText().strip(), "algo": self.algo.currentText(),
            "episodes": self.episodes.value(), "seed": self.seed.value(),
            "telemetry": self.telemetry.currentText(), "agent_id": self.agent_id.text().strip(),
        }
        if config["telemetry"] == TelemetryMode.SAMPLED.value:
            config["every"] = self.every.value()
        if self.name.text().strip():
            config["name"] = self.name.text().strip()
        return config

    def check_and_accept(self) -> None:
        try:
            check_environment(parse_config(self.config()))
        except GymbusError as exc:
            self.error.setText(str(exc))
            return
        self.accept()


class RunsPanel(QtWidgets.QWidget):
    """Runs with their states; Submit, Cancel, Open (a tab for the selected run)."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__()
        self.window_ = window
        self.table = QtWidgets.QTableWidget(0, len(RUN_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(RUN_COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
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
            for col, text in enumerate((v.run_id[-10:], v.env, v.algo, v.telemetry, state,
                                        str(v.episodes), str(v.seqs.missed))):
                item = QtWidgets.QTableWidgetItem(text)
                item.setData(QtCore.Qt.ItemDataRole.UserRole, v.run_id)
                item.setToolTip(v.run_id)
                self.table.setItem(row, col, item)
            if v.run_id == selected:
                self.table.selectRow(row)
        self.table.resizeColumnsToContents()

    def ask_and_submit(self) -> None:
        dialog = SubmitDialog(self)
        if dialog.exec() == QtWidgets.QDialog.DialogCode.Accepted:
            self.submit(dialog.config())

    def submit(self, config: dict[str, Any]) -> str | None:
        """Submit a run config to the controller; its run id (None, and a message, if refused)."""
        try:
            reply = self.window_.controller.request(Command.SUBMIT,
                                                    {"config": config, "idempotency_key": ""})
        except GymbusError as exc:
            self.window_.say(f"submit refused: {exc}")
            return None
        run_id: str = reply["run_id"]
        self.window_.say(f"submitted {run_id}")
        self.window_.live.view(run_id).set_record(reply["run"])
        return run_id

    def cancel(self, run_id: str | None) -> None:
        if run_id is None:
            self.window_.say("select a run to cancel")
            return
        try:
            run = self.window_.controller.request(Command.CANCEL, {"run_id": run_id})["run"]
        except GymbusError as exc:
            self.window_.say(f"cannot cancel {run_id}: {exc}")
            return
        self.window_.live.view(run_id).set_record(run)
        self.window_.say(f"cancelling {run_id}: {run['state']}")

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
        self.live = live or Live(settings, run_ids)
        self.named = list(run_ids)
        self.controller = Client(settings.controller, "controller", REQUEST_TIMEOUT)
        self.agent_tabs: dict[tuple[str, str], AgentTab] = {}
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.setTabsClosable(True)
        self.tabs.tabCloseRequested.connect(self.close_tab)
        self.runs_panel = RunsPanel(self)
        splitter = QtWidgets.QSplitter()
        splitter.addWidget(self.runs_panel)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([380, 900])
        self.setCentralWidget(splitter)
        self.accounting = QtWidgets.QLabel()
        self.statusBar().addPermanentWidget(self.accounting)
        self.poll_timer = QtCore.QTimer(self)
        self.poll_timer.setInterval(POLL_MS)
        self.poll_timer.timeout.connect(self.on_poll)
        self.refresh_timer = QtCore.QTimer(self)
        self.refresh_timer.setInterval(REFRESH_MS)
        self.refresh_timer.timeout.connect(self.on_refresh)
        self.resize(1280, 800)

    def start(self) -> None:
        """Subscribe, snapshot, open the named runs' tabs, start the timers (GUI thread)."""
        self.live.start()
        for run_id in self.named:
            self.open_tab(run_id)
        self.on_refresh()
        self.poll_timer.start()
        self.refresh_timer.start()

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
            tab = self.agent_tabs[key] = AgentTab(view, self.settings)
            self.tabs.addTab(tab, f"{key[1]} · {run_id[-6:]}")
            self.tabs.setTabToolTip(self.tabs.indexOf(tab), f"{key[1]} of run {run_id}")
        return tab

    def close_tab(self, index: int) -> None:
        widget = self.tabs.widget(index)
        self.tabs.removeTab(index)
        self.agent_tabs = {k: t for k, t in self.agent_tabs.items() if t is not widget}

    def on_poll(self) -> None:
        """Drain the live feed; a run's first frame opens its agent's tab (GUI thread)."""
        frames = self.live.poll()
        touched = {(f.run_id, f.agent_id) for f in frames}
        for run_id, agent_id in touched:
            self.open_tab(run_id, agent_id).update_view()

    def on_refresh(self) -> None:
        """Run states and accounting from the services, then every tab and the runs panel."""
        self.live.refresh()
        order = {run_id: i for i, run_id in enumerate(self.live.order)}
        views = sorted(self.live.runs.values(), key=lambda v: order.get(v.run_id, len(order)))
        self.runs_panel.show_runs(views)
        for tab in self.agent_tabs.values():
            tab.update_view()
        t = self.live.totals()
        self.accounting.setText(
            f"controller {'ok' if self.live.controller_ok else 'down'} · ingest "
            f"{'ok' if self.live.ingest_ok else 'down'} · live frames {t['live']} · missed "
            f"{t['missed']} (dropped here {t['dropped']}) · from store {t['from_store']}")

    def closeEvent(self, event: Any) -> None:
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the timers and the feed; idempotent."""
        self.poll_timer.stop()
        self.refresh_timer.stop()
        self.live.close()
        self.controller.close()


class BrokenBindings(GymbusError):
    """The installed PySide6 would crash the viewer; install the version `gymbus[qt]` pins."""

    exit_code = 2


def bindings_broken() -> bool:
    """Whether these bindings drop a reference to None at every call of a method that returns
    nothing (PySide6 6.12.0 on Python 3.11): the process aborts with `none_dealloc` once None's
    count reaches zero. Measured, not guessed from the version: 100 calls, None's count after."""
    if sys.version_info >= (3, 12):
        return False  # None is immortal there
    rect = QtCore.QRectF()
    before = sys.getrefcount(None)
    for _ in range(100):
        rect.adjust(0, 0, 0, 0)
    return sys.getrefcount(None) < before - 50


def check_bindings() -> None:
    """Raise BrokenBindings, saying what to install, when `bindings_broken()`."""
    if bindings_broken():
        import PySide6

        raise BrokenBindings(
            f"PySide6 {PySide6.__version__} on Python {sys.version.split()[0]} loses a reference "
            "to None at every call and would crash the viewer; install PySide6-Essentials<6.12 "
            "(pip install 'gymbus[qt]' pins it)")


def main(settings: Settings, run_ids: Sequence[str] = ()) -> int:
    """Run the viewer until its window closes; the exit code."""
    check_bindings()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    window = MainWindow(settings, run_ids)
    window.start()
    window.show()
    try:
        return int(app.exec())
    finally:
        window.shutdown()
