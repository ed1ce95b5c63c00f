"""One agent's tab of the Qt viewer: the live grid world, return and episode-length curves, the
episodes table, and the replay of a stored episode (slider, play/pause).

Everything here runs on the GUI thread: the window calls `AgentTab.update_view` from its timers;
the replay reads DuckDB through the ingest's query API, or the file when no ingest answers (a
`StoreClient`: a short blocking request).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from gymbus.services.ingest.client import StoreClient
from gymbus.services.viewers.grid import action_name
from gymbus.services.viewers.live_runs import RunView
from gymbus.services.viewers.qt.grid import GridWidget
from gymbus.services.viewers.replay import Replay, fallback_metrics, load_episode
from gymbus.shared.errors import GymbusError
from gymbus.shared.settings import Settings

#: rows of the episodes table (the newest first)
TABLE_ROWS = 200
#: seconds between two redraws of the curves and the table
REDRAW_SECONDS = 0.5
PLAY_INTERVAL_MS = 150
REQUEST_TIMEOUT = 3.0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class ReplayPanel(QtWidgets.QWidget):
    """Pick a stored episode of the run and step through it (GUI thread)."""

    def __init__(self, view: RunView, settings: Settings) -> None:
        super().__init__()
        self.view = view
        self.settings = settings
        self.replay: Replay | None = None
        self.episode = QtWidgets.QSpinBox()
        self.episode.setRange(0, 0)
        self.load_button = QtWidgets.QPushButton("Load")
        self.play_button = QtWidgets.QPushButton("Play")
        self.play_button.setEnabled(False)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.slider.setEnabled(False)
        self.info = QtWidgets.QLabel("pick an episode and load it")
        self.info.setWordWrap(True)
        self.grid = GridWidget()
        self.grid.message = "no episode loaded"
        #: what a run without stored steps shows instead of the board: its metric curves
        self.metrics = pg.GraphicsLayoutWidget()
        self.metrics.setBackground("w")
        self.stack = QtWidgets.QStackedWidget()
        self.stack.addWidget(self.grid)
        self.stack.addWidget(self.metrics)
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(PLAY_INTERVAL_MS)
        controls = QtWidgets.QHBoxLayout()
        for widget in (QtWidgets.QLabel("episode"), self.episode, self.load_button,
                       self.play_button):
            controls.addWidget(widget)
        controls.addWidget(self.slider, 1)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.info)
        layout.addWidget(self.stack, 1)
        self.load_button.clicked.connect(lambda: self.load(self.episode.value()))
        self.slider.valueChanged.connect(self.show_step)
        self.play_button.clicked.connect(self.toggle_play)
        self.timer.timeout.connect(self.advance)

    def set_episodes(self, count: int) -> None:
        self.episode.setMaximum(max(0, count - 1))

    def load(self, episode: int) -> bool:
        """Read the episode and its steps from the store; False (and says why) when it cannot."""
        self.timer.stop()
        self.play_button.setText("Play")
        store = StoreClient(self.settings, REQUEST_TIMEOUT)
        try:
            replay = load_episode(store, self.view.run_id, episode)
            metrics = [] if replay.steps else fallback_metrics(store, self.view.run_id)
        except GymbusError as exc:
            self.info.setText(f"cannot replay episode {episode}: {exc}")
            return False
        finally:
            store.close()
        self.replay = replay
        self.episode.setValue(episode)
        has_steps = bool(replay.steps)
        self.slider.setEnabled(has_steps)
        self.play_button.setEnabled(has_steps)
        if not has_steps:
            self.info.setText(f"{replay.why_no_steps()}. Stored instead: episode {episode} "
                              f"returned {replay.ret:g} in {replay.length} steps; the run's "
                              f"metrics below.")
            self.show_metrics(metrics)
            return True
        self.stack.setCurrentWidget(self.grid)
        self.slider.blockSignals(True)
        self.slider.setRange(0, len(replay.steps) - 1)
        self.slider.setValue(0)
        self.slider.blockSignals(False)
        self.show_step(0)
        return True

    def show_metrics(self, metrics: list[dict[str, Any]]) -> None:
        """One small plot per metric (its curve of bucket means), instead of the board."""
        self.metrics.clear()
        for i, m in enumerate(metrics):
            plot = self.metrics.addPlot(row=i // 2, col=i % 2,
                                        title=f"{m['name']} (last {m['last']:.4g})")
            plot.plot(m["curve"], pen=pg.mkPen("#08519c", width=2),
                      symbol="o" if len(m["curve"]) < 3 else None)
        self.stack.setCurrentWidget(self.metrics)

    def show_step(self, index: int) -> None:
        replay = self.replay
        if replay is None or not 0 <= index < len(replay.steps):
            return
        s = replay.steps[index]
        text = (f"episode {replay.episode} (return {replay.ret:g}, {replay.length} steps): "
                f"step {s['step']}  {action_name(replay.env, s['action'])}  reward {s['reward']:g}")
        if s["label"]:
            text += f"  {replay.label_name}: {s['label']}"
        if replay.world is None:
            text += f"  obs {s['obs']}"
        self.info.setText(text)
        self.grid.show_scene(replay.scene(index), "not a grid world")

    def toggle_play(self) -> None:
        if self.timer.isActive():
            self.timer.stop()
            self.play_button.setText("Play")
        else:
            if self.slider.value() >= self.slider.maximum():
                self.slider.setValue(0)
            self.timer.start()
            self.play_button.setText("Pause")

    def advance(self) -> None:
        if self.slider.value() >= self.slider.maximum():
            self.toggle_play()
        else:
            self.slider.setValue(self.slider.value() + 1)


class AgentTab(QtWidgets.QWidget):
    """One agent of one run: live board, curves, episodes, replay."""

    def __init__(self, view: RunView, settings: Settings) -> None:
        super().__init__()
        self.view = view
        self.header = QtWidgets.QLabel()
        self.header.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.header.setWordWrap(True)
        self.grid = GridWidget()
        self.step = QtWidgets.QLabel("")
        self.curves = pg.GraphicsLayoutWidget()
        self.curves.setBackground("w")
        self.returns_plot = self.curves.addPlot(row=0, col=0, title="return per episode")
        self.lengths_plot = self.curves.addPlot(row=1, col=0, title="episode length")
        self.returns_points = self.returns_plot.plot(pen=pg.mkPen("#9ecae1", width=1))
        self.returns_mean = self.returns_plot.plot(pen=pg.mkPen("#08519c", width=2))
        self.lengths_line = self.lengths_plot.plot(pen=pg.mkPen("#fd8d3c", width=1))
        self.table = QtWidgets.QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["episode", "return", "length", "mean (100)"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.replay = ReplayPanel(view, settings)
        board = QtWidgets.QVBoxLayout()
        board.addWidget(self.grid, 1)
        board.addWidget(self.step)
        top = QtWidgets.QHBoxLayout()
        top.addLayout(board, 2)
        top.addWidget(self.curves, 3)
        bottom = QtWidgets.QTabWidget()
        bottom.addTab(self.table, "Episodes")
        bottom.addTab(self.replay, "Replay")
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addLayout(top, 3)
        layout.addWidget(bottom, 2)
        self._drawn_episodes = -1
        self._drawn_at = 0.0
        self.update_view(force=True)

    def update_view(self, force: bool = False) -> None:
        """Redraw from the RunView: header and board always, curves and table when due."""
        v = self.view
        state = v.status if v.status and v.state in ("", "running") else v.state or "?"
        stats = v.stats
        self.header.setText(
            f"<b>{v.run_id}</b> &nbsp; {v.agent_id} &nbsp; {v.env} &nbsp; {v.algo} &nbsp; "
            f"{v.telemetry} &nbsp; <b>{state}</b> &nbsp; episodes {v.episodes} &nbsp; "
            f"steps/s {_fmt(v.sps)} &nbsp; last return "
            f"{_fmt(v.returns[-1] if v.returns else None)} &nbsp; mean(100) {_fmt(v.mean_return())}"
            f" &nbsp; stored {stats.get('frames_stored', '-')} &nbsp; gaps {stats.get('gaps', '-')}"
            f" &nbsp; missed live {v.seqs.missed}")
        self._update_board()
        now = time.monotonic()
        if force or (len(v.returns) != self._drawn_episodes and now - self._drawn_at >= REDRAW_SECONDS):
            self._update_curves()
            self._drawn_episodes, self._drawn_at = len(v.returns), now
        self.replay.set_episodes(v.episodes)

    def _update_board(self) -> None:
        v, step = self.view, self.view.last_step
        if v.world is None:
            message = f"{v.env or 'the environment'} is not a grid world"
        elif v.telemetry == "fast":
            message = "fast mode: no steps are sent"
        else:
            message = "no steps yet"
        self.grid.show_scene(v.scene(), message)
        if step is not None:
            text = (f"episode {step.episode} step {step.step}: {action_name(v.env, step.action)}, "
                    f"reward {step.reward:g}")
            if step.label:
                text += f", {step.label}"
            if v.world is None:
                text += f", obs {step.obs}"
            self.step.setText(text)

    def _update_curves(self) -> None:
        v = self.view
        if not v.returns:
            return
        x = np.asarray(v.episode_ids, dtype=float)
        returns = np.asarray(v.returns, dtype=float)
        self.returns_points.setData(x, returns)
        window = max(1, min(100, len(returns) // 10))
        mean = np.convolve(returns, np.ones(window) / window, mode="valid")
        self.returns_mean.setData(x[window - 1:], mean)
        self.lengths_line.setData(x, np.asarray(v.lengths, dtype=float))
        rows = min(TABLE_ROWS, len(returns))
        self.table.setRowCount(rows)
        for i in range(rows):
            j = len(returns) - 1 - i
            tail = returns[max(0, j - 99):j + 1]
            for col, value in enumerate((str(v.episode_ids[j]), f"{returns[j]:g}",
                                         str(v.lengths[j]), f"{tail.mean():.4g}")):
                self.table.setItem(i, col, QtWidgets.QTableWidgetItem(value))
