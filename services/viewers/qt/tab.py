"""One agent's tab of the Qt viewer: the live grid world, return and episode-length curves, the
episodes table, and the replay of a stored episode (slider, play/pause).

Everything here runs on the GUI thread: the window calls `AgentTab.update_view` from its timers.
The replay reads DuckDB through the ingest's query API, or the file when no ingest answers (a
`StoreClient`), on the window's request thread; what it read comes back to the GUI thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from gymbus.services.ingest.client import StoreClient
from gymbus.services.viewers.grid import action_name, obs_text
from gymbus.services.viewers.live_runs import RunView
from gymbus.services.viewers.qt.grid import GridWidget
from gymbus.services.viewers.qt.requests import Requests
from gymbus.services.viewers.replay import Replay, fallback_metrics, load_episode
from gymbus.shared.errors import GymbusError
from gymbus.shared.settings import Settings

#: rows of the episodes table (the newest first)
TABLE_ROWS = 200
#: seconds between two redraws of the curves and the table
REDRAW_SECONDS = 0.5
PLAY_INTERVAL_MS = 150
REQUEST_TIMEOUT = 3.0
#: the least a plot is given, in pixels: the layouts shrink other things first
PLOT_MIN_WIDTH, PLOT_MIN_HEIGHT = 240, 160
CURVE_COLOURS = ("#08519c", "#fd8d3c", "#31a354", "#756bb1", "#e6550d", "#636363")


def _fmt(value: float | None) -> str:
    """A number in four significant digits, or whole with thousands separated (41,543)."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _wrapping_label(text: str = "") -> QtWidgets.QLabel:
    """A label that wraps its text to the width it is given instead of asking for more."""
    label = QtWidgets.QLabel(text)
    label.setWordWrap(True)
    label.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored,
                        QtWidgets.QSizePolicy.Policy.Minimum)
    return label


class EpisodesDrawn(NamedTuple):
    """What a tab's curves and table show of its run's episodes."""

    episodes: int
    last_return: float | None
    mean_return: float | None


class ReplayPanel(QtWidgets.QWidget):
    """Pick a stored episode of the run and step through it (GUI thread)."""

    #: an episode was loaded (True) or could not be (False)
    loaded = QtCore.Signal(bool)

    def __init__(self, view: RunView, settings: Settings, requests: Requests,
                 ask_ingest: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.view = view
        self.settings = settings
        self.requests = requests
        self.ask_ingest = ask_ingest
        self.replay: Replay | None = None
        self.episode = QtWidgets.QSpinBox()
        self.episode.setRange(0, 0)
        self.load_button = QtWidgets.QPushButton("Load")
        self.play_button = QtWidgets.QPushButton("Play")
        self.play_button.setEnabled(False)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.slider.setEnabled(False)
        self.info = _wrapping_label("pick an episode and load it")
        self.grid = GridWidget()
        self.grid.message = "no episode loaded"
        #: what a run that is not a grid world shows: its observation along the episode
        self.obs_plot = pg.PlotWidget(background="w")
        self.obs_plot.setLabel("bottom", "step")
        self.obs_plot.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200),
                                labelTextColor="#343a40")
        self.obs_cursor = pg.InfiniteLine(angle=90, pen=pg.mkPen("#c0392b", width=1))
        #: what a run without stored steps shows instead of the board: its metric curves
        self.metrics = pg.GraphicsLayoutWidget()
        self.metrics.setBackground("w")
        self.metrics_view = QtWidgets.QScrollArea()  # as many plots as the run has metrics
        self.metrics_view.setWidgetResizable(True)
        self.metrics_view.setWidget(self.metrics)
        self.stack = QtWidgets.QStackedWidget()
        for widget in (self.grid, self.obs_plot, self.metrics_view):
            self.stack.addWidget(widget)
        self.stack.setMinimumHeight(PLOT_MIN_HEIGHT)
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

    def load(self, episode: int) -> None:
        """Read the episode and its steps from the store, on the request thread; `loaded` says
        whether it could (and the panel why not)."""
        self.timer.stop()
        self.play_button.setText("Play")
        self.load_button.setEnabled(False)
        self.info.setText(f"loading episode {episode}…")
        settings, run_id, ask_ingest = self.settings, self.view.run_id, self.ask_ingest()

        def read() -> tuple[Replay, list[dict[str, Any]]]:  # on the request thread
            with StoreClient(settings, REQUEST_TIMEOUT) as store:
                store.ask_ingest = ask_ingest
                replay = load_episode(store, run_id, episode)
                return replay, [] if replay.steps else fallback_metrics(store, run_id)

        self.requests.call(read, self._show_loaded, lambda exc: self._load_failed(episode, exc))

    def _load_failed(self, episode: int, exc: Exception) -> None:
        self.load_button.setEnabled(True)
        if not isinstance(exc, GymbusError):
            raise exc
        self.info.setText(f"cannot replay episode {episode}: {exc}")
        self.loaded.emit(False)

    def _show_loaded(self, loaded: tuple[Replay, list[dict[str, Any]]]) -> None:
        replay, metrics = loaded
        self.load_button.setEnabled(True)
        self.replay = replay
        self.episode.setValue(replay.episode)
        has_steps = bool(replay.steps)
        self.slider.setEnabled(has_steps)
        self.play_button.setEnabled(has_steps)
        if not has_steps:
            self.info.setText(f"{replay.why_no_steps()}. Stored instead: episode {replay.episode} "
                              f"returned {replay.ret:g} in {replay.length} steps; the run's "
                              f"metrics below.")
            self.show_metrics(metrics)
        else:
            if replay.world is None:
                self.show_observations(replay)
            self.stack.setCurrentWidget(self.grid if replay.world is not None else self.obs_plot)
            self.slider.blockSignals(True)
            self.slider.setRange(0, len(replay.steps) - 1)
            self.slider.setValue(0)
            self.slider.blockSignals(False)
            self.show_step(0)
        self.loaded.emit(True)

    def show_metrics(self, metrics: list[dict[str, Any]]) -> None:
        """One plot per metric (its bucket means against the run's steps), instead of the board."""
        self.metrics.clear()
        for i, m in enumerate(metrics):
            plot = self.metrics.addPlot(row=i // 2, col=i % 2,
                                        title=f"{m['name']} (last {m['last']:.4g})")
            plot.setLabel("bottom", "step")
            plot.plot(m["steps"], m["curve"], pen=pg.mkPen("#08519c", width=2),
                      symbol="o" if len(m["curve"]) < 3 else None)
        self.metrics.setMinimumHeight((len(metrics) + 1) // 2 * PLOT_MIN_HEIGHT)
        self.stack.setCurrentWidget(self.metrics_view)

    def show_observations(self, replay: Replay) -> None:
        """The episode's observation, one curve per component, against the step."""
        self.obs_plot.clear()
        held = [s for s in replay.steps if s["obs"] is not None]  # a recording may omit it
        steps = np.asarray([s["step"] for s in held], dtype=float)
        try:
            values = np.asarray([s["obs"] if isinstance(s["obs"], list) else [s["obs"]]
                                 for s in held], dtype=float)
        except (TypeError, ValueError):  # not numbers of one length: nothing to plot
            values = np.empty((0, 0))
        for j in range(values.shape[1] if values.ndim == 2 else 0):
            self.obs_plot.plot(steps, values[:, j], name=f"obs[{j}]",
                               pen=pg.mkPen(CURVE_COLOURS[j % len(CURVE_COLOURS)], width=2))
        self.obs_plot.addItem(self.obs_cursor)

    def show_step(self, index: int) -> None:
        replay = self.replay
        if replay is None or not 0 <= index < len(replay.steps):
            return
        s = replay.steps[index]
        text = (f"episode {replay.episode} (return {replay.ret:g}, {replay.length} steps): "
                f"step {s['step']}  action {action_name(replay.env, s['action'])}  "
                f"reward {s['reward']:g}")
        if s["label"]:
            text += f"  {replay.label_name}: {s['label']}"
        if replay.world is None:
            text += f"  obs {obs_text(s['obs'])}"
            self.obs_cursor.setValue(s["step"])
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
    """One agent of one run: live board (grid worlds), curves, episodes, replay.

    Above, the board beside the curves (the curves alone for other environments) and the last
    step; below, the episodes and the replay, in a splitter that keeps both in view."""

    def __init__(self, view: RunView, settings: Settings, requests: Requests,
                 ask_ingest: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.view = view
        self.header = _wrapping_label()
        self.header.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.grid = GridWidget()
        self.step = _wrapping_label()
        self.curves = pg.GraphicsLayoutWidget()
        self.curves.setBackground("w")
        self.curves.setMinimumSize(PLOT_MIN_WIDTH, 2 * PLOT_MIN_HEIGHT + 20)
        self.returns_plot = self.curves.addPlot(row=0, col=0, title="return per episode")
        self.lengths_plot = self.curves.addPlot(row=1, col=0, title="episode length")
        for plot in (self.returns_plot, self.lengths_plot):
            plot.setLabel("bottom", "episode")
        self.returns_points = self.returns_plot.plot(pen=pg.mkPen("#9ecae1", width=1))
        self.returns_mean = self.returns_plot.plot(pen=pg.mkPen("#08519c", width=2))
        self.lengths_line = self.lengths_plot.plot(pen=pg.mkPen("#fd8d3c", width=1))
        self.table = QtWidgets.QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["episode", "return", "length", "mean (100)"])
        self.table.horizontalHeader().setSectionResizeMode(
            QtWidgets.QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.replay = ReplayPanel(view, settings, requests, ask_ingest)
        boards = QtWidgets.QHBoxLayout()
        boards.addWidget(self.grid, 2)
        boards.addWidget(self.curves, 3)
        top = QtWidgets.QWidget()
        top_layout = QtWidgets.QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addLayout(boards, 1)
        top_layout.addWidget(self.step)
        self.bottom = QtWidgets.QTabWidget()
        self.bottom.addTab(self.table, "Episodes")
        self.bottom.addTab(self.replay, "Replay")
        self.bottom.setMinimumHeight(PLOT_MIN_HEIGHT + 80)  # the replay's controls and its plot
        self.splitter = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        self.splitter.addWidget(top)
        self.splitter.addWidget(self.bottom)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.splitter.setSizes([450, 300])
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addWidget(self.splitter, 1)
        #: what the curves and the table were last drawn from: the episodes they hold (their
        #: count, the last one's return, the mean of the last 100), which the header shows too
        self.drawn = EpisodesDrawn(0, None, None)
        self._drawn_seen = -1
        self._drawn_at = 0.0
        self.update_view(force=True)

    def update_view(self, force: bool = False) -> None:
        """Redraw from the RunView: header and board always, curves and table when due; the
        header's episode numbers are those the curves and the table were drawn from."""
        v = self.view
        now = time.monotonic()
        if force or (v.episodes_seen != self._drawn_seen and now - self._drawn_at >= REDRAW_SECONDS):
            self._update_curves()
            self._drawn_seen, self._drawn_at = v.episodes_seen, now
        state = v.status if v.status and v.state in ("", "running") else v.state or "?"
        stats, drawn = v.stats, self.drawn
        name = f" &nbsp; <i>{v.name}</i>" if v.name else ""
        tags = f" &nbsp; {v.tags_text()}" if v.tags else ""
        stored = int(stats.get("episodes") or 0)
        more = f" ({stored:,} stored)" if stored > drawn.episodes else ""
        fields = [v.agent_id, v.env, v.algo, v.telemetry, f"episodes {drawn.episodes:,}{more}", f"steps/s {_fmt(v.sps)}",
                  f"last return {_fmt(drawn.last_return)}",
                  f"mean(100) {_fmt(drawn.mean_return)}",
                  f"stored {stats.get('frames_stored', '-')}", f"gaps {stats.get('gaps', '-')}",
                  f"missed live {v.seqs.missed}"]
        # a line breaks between two fields, never inside one (a label apart from its number):
        # no-break spaces, and a word joiner after a slash (steps/s)
        kept = [f.replace(" ", "&nbsp;").replace("/", "/&#8288;") for f in fields]
        self.header.setText(" &nbsp; ".join([f"<b>{v.run_id}</b>{name}{tags}", *kept[:4],
                                             f"<b>{state}</b>", *kept[4:]]))
        self._update_board()
        self.replay.set_episodes(v.episodes)

    def _update_board(self) -> None:
        v, step = self.view, self.view.last_step
        # a board only for grid worlds: the curves take the width of the others
        self.grid.setVisible(v.world is not None or not v.env)
        if v.world is None:
            message = f"{v.env or 'the environment'} is not a grid world"
        elif v.telemetry == "fast":
            message = "fast mode: no steps are sent"
        else:
            message = "no steps yet"
        self.grid.show_scene(v.scene(), message)
        if step is not None:
            text = (f"episode {step.episode} step {step.step}: action "
                    f"{action_name(v.env, step.action)}, reward {step.reward:g}")
            if step.label:
                text += f", {step.label}"
            if v.world is None:
                text += f", obs {obs_text(step.obs)}"
            self.step.setText(text)

    def _update_curves(self) -> None:
        """The curves and the table from the episodes the view holds, and `drawn`."""
        v = self.view
        if not v.returns:
            return
        # the episodes received; where the snapshot held only the latest, the last one's number
        self.drawn = EpisodesDrawn(max(v.episodes_seen, v.episode_ids[-1] + 1), v.returns[-1],
                                   v.mean_return())
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
