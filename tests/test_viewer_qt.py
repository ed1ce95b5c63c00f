"""The Qt viewer, offscreen (pytest-qt): a tab per agent from the live stream, replay from DuckDB,
the runs panel and its form, and a screenshot that is not blank. Requests run on the window's
request thread: the tests wait for what they bring back."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6", reason="the Qt viewer is an optional extra: pip install '.[qt]'")
pytest.importorskip("pyqtgraph", reason="the Qt viewer is an optional extra: pip install '.[qt]'")

from conftest import gymbus_cli_json, stack_fixture, wait_until
from test_live import VIEWER_ENV, run_state, stored, submit

from gymbus.services.ingest.client import StoreClient
from gymbus.services.stack.launcher import Stack
from gymbus.services.viewers.grid import GridWorld
from gymbus.services.viewers.qt import window as viewer_qt
from gymbus.services.viewers.qt.tab import AgentTab
from gymbus.shared.protocol import TERMINAL_STATES

pytestmark = pytest.mark.integration

if viewer_qt.bindings_broken():
    pytest.skip("this PySide6 loses a reference to None at every call and would abort the "
                "tests (PySide6 6.12.0 on Python 3.11): install PySide6-Essentials<6.12",
                allow_module_level=True)

TIMEOUT_MS = 60_000


stack = stack_fixture("qt", **VIEWER_ENV)


@pytest.fixture
def window(qtbot: object, stack: Stack) -> Iterator[viewer_qt.MainWindow]:
    w = viewer_qt.MainWindow(stack.settings)
    qtbot.addWidget(w)  # type: ignore[attr-defined]
    w.start()
    w.show()
    try:
        yield w
    finally:
        w.shutdown()


@pytest.fixture(scope="module")
def taxi_run(stack: Stack) -> str:
    return submit(stack, env="Taxi-v4", episodes=1500)


def load(qtbot: object, tab: AgentTab, episode: int) -> bool:
    """Load a stored episode in the tab's replay; whether it could."""
    with qtbot.waitSignal(tab.replay.loaded, timeout=TIMEOUT_MS) as blocker:  # type: ignore[attr-defined]
        tab.replay.load(episode)
    return bool(blocker.args[0])


def submitted(qtbot: object, window: viewer_qt.MainWindow, config: dict[str, Any]) -> str:
    """Submit from the runs panel; the run id the controller gave."""
    with qtbot.waitSignal(window.runs_panel.submitted,  # type: ignore[attr-defined]
                          timeout=TIMEOUT_MS) as blocker:
        window.runs_panel.submit(config)
    return str(blocker.args[0])


def test_a_tab_appears_when_a_runs_frames_arrive(qtbot: object, window: viewer_qt.MainWindow,
                                                 stack: Stack, taxi_run: str) -> None:
    wait = qtbot.waitUntil  # type: ignore[attr-defined]
    wait(lambda: window.tab_for(taxi_run) is not None, timeout=TIMEOUT_MS)
    tab = window.tab_for(taxi_run)
    assert tab is not None and window.tabs.count() >= 1
    assert window.tabs.tabText(window.tabs.indexOf(tab)).startswith("agent-0")
    wait(lambda: tab.grid.scene is not None and tab.grid.scene.family == "Taxi",
         timeout=TIMEOUT_MS)
    wait(lambda: window.live.runs[taxi_run].settled, timeout=TIMEOUT_MS)
    view = window.live.runs[taxi_run]
    wait(lambda: view.episodes == 1500, timeout=TIMEOUT_MS)
    assert view.seqs.missed == 0
    wait(lambda: tab.table.rowCount() > 0 and tab.table.item(0, 0).text() == "1499",
         timeout=TIMEOUT_MS)  # the curves and the table are redrawn twice a second at most
    wait(lambda: "completed" in tab.header.text(), timeout=TIMEOUT_MS)
    xs, _ = tab.returns_points.getData()
    assert xs is not None and len(xs) == 1500


def test_replay_steps_through_the_stored_episode(qtbot: object, window: viewer_qt.MainWindow,
                                                 stack: Stack, taxi_run: str) -> None:
    wait_until(lambda: stored(stack, taxi_run).get("complete"), 60, "the run to be stored")
    tab = window.open_tab(taxi_run)
    assert load(qtbot, tab, 1200)
    reader = StoreClient(stack.settings)
    try:
        rows = reader.rows(f"SELECT step, obs, action FROM steps WHERE run_id = '{taxi_run}' "
                           "AND episode = 1200 ORDER BY step")
    finally:
        reader.close()
    replay = tab.replay.replay
    assert replay is not None and len(replay.steps) == len(rows) == replay.length
    assert tab.replay.slider.maximum() == len(rows) - 1
    world = GridWorld.for_env("Taxi-v4")
    assert world is not None
    for index in (0, len(rows) // 2, len(rows) - 1):
        tab.replay.slider.setValue(index)
        assert tab.replay.grid.scene == world.scene(rows[index]["obs"])
        assert f"step {rows[index]['step']}" in tab.replay.info.text()
    tab.replay.slider.setValue(0)
    tab.replay.play_button.click()
    qtbot.waitUntil(lambda: tab.replay.slider.value() == len(rows) - 1,  # type: ignore[attr-defined]
                    timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: not tab.replay.timer.isActive())  # type: ignore[attr-defined]
    assert not load(qtbot, tab, 99_999)  # not stored: says so, keeps the loaded one
    assert tab.replay.replay is replay
    assert "not stored" in tab.replay.info.text()


def test_a_fast_run_shows_what_was_stored_instead(qtbot: object, window: viewer_qt.MainWindow,
                                                  stack: Stack) -> None:
    run_id = submitted(qtbot, window, {"env": "FrozenLake-v1", "algo": "q-learning",
                                       "episodes": 300, "telemetry": "fast"})
    qtbot.waitUntil(lambda: window.tab_for(run_id) is not None,  # type: ignore[attr-defined]
                    timeout=TIMEOUT_MS)
    wait_until(lambda: stored(stack, run_id).get("complete"), 60, "the run to be stored")
    tab = window.tab_for(run_id)
    assert tab is not None
    assert tab.grid.scene is None and "fast mode" in tab.grid.message
    assert load(qtbot, tab, 5)
    assert "fast mode: no steps were stored" in tab.replay.info.text()
    assert tab.replay.stack.currentWidget() is tab.replay.metrics_view
    assert not tab.replay.play_button.isEnabled()


def test_the_runs_panel_lists_runs_imported_from_tensorboard(
        qtbot: object, window: viewer_qt.MainWindow, stack: Stack) -> None:
    run_id = submit(stack, env="FrozenLake-v1", episodes=50, telemetry="fast")
    wait_until(lambda: stored(stack, run_id).get("complete"), 60, "the run to be stored")
    (imported,) = gymbus_cli_json(stack.process_env(), "import-tb", run_id)
    tb_run = imported["run_id"]  # in the store; the controller never made it
    table = window.runs_panel.table

    def listed() -> dict[str, str]:
        state = viewer_qt.RUN_COLUMNS.index("state")
        return {table.item(r, 0).toolTip(): table.item(r, state).text()
                for r in range(table.rowCount())}

    qtbot.waitUntil(lambda: tb_run in listed(), timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
    assert window.live.controller_ok and run_id in listed()
    assert listed()[tb_run] == "completed"
    assert window.live.runs[tb_run].env == "FrozenLake-v1"


def test_the_runs_panel_submits_and_cancels(qtbot: object, window: viewer_qt.MainWindow,
                                            stack: Stack) -> None:
    dialog = viewer_qt.SubmitDialog(window)
    qtbot.addWidget(dialog)  # type: ignore[attr-defined]
    dialog.env.setCurrentText("NoSuchEnv-v0")
    dialog.check_and_accept()  # the form checks the config before it submits
    assert "NoSuchEnv-v0" in dialog.error.text() and not dialog.result()
    dialog.env.setCurrentText("FrozenLake-v1")
    dialog.episodes.setValue(10_000_000)
    dialog.telemetry.setCurrentText("sampled")
    dialog.check_and_accept()
    assert dialog.result() and dialog.config()["every"] == 10
    run_id = submitted(qtbot, window, dialog.config())
    qtbot.waitUntil(lambda: window.live.runs.get(run_id) is not None  # type: ignore[attr-defined]
                    and window.live.runs[run_id].state == "running", timeout=TIMEOUT_MS)
    table = window.runs_panel.table
    qtbot.waitUntil(lambda: any(table.item(r, 0).toolTip() == run_id  # type: ignore[attr-defined]
                                for r in range(table.rowCount())), timeout=TIMEOUT_MS)
    row = next(r for r in range(table.rowCount()) if table.item(r, 0).toolTip() == run_id)
    window.runs_panel.table.selectRow(row)
    assert window.runs_panel.selected() == run_id
    window.runs_panel.cancel_button.click()
    wait_until(lambda: run_state(stack, run_id) in TERMINAL_STATES, 20, "the run to stop")
    assert run_state(stack, run_id) == "cancelled"
    qtbot.waitUntil(lambda: window.live.runs[run_id].ended,  # type: ignore[attr-defined]
                    timeout=TIMEOUT_MS)


def test_the_form_submits_a_dqn_run(qtbot: object, window: viewer_qt.MainWindow,
                                    stack: Stack) -> None:
    dialog = viewer_qt.SubmitDialog(window)
    qtbot.addWidget(dialog)  # type: ignore[attr-defined]
    dialog.env.setCurrentText("CartPole-v1")
    dialog.algo.setCurrentText("dqn")  # proposes a step budget
    assert dialog.total_steps.value() > 0 and dialog.episodes.value() == 0
    dialog.total_steps.setValue(1500)
    dialog.agent_args.setText("learning_starts=200 hidden_sizes=[16]")
    dialog.telemetry.setCurrentText("fast")
    dialog.check_and_accept()
    assert dialog.result(), dialog.error.text()
    run_id = submitted(qtbot, window, dialog.config())
    wait_until(lambda: run_state(stack, run_id) in TERMINAL_STATES, 60, "the dqn run to end")
    assert run_state(stack, run_id) == "completed"
    qtbot.waitUntil(lambda: window.live.runs[run_id].ended,  # type: ignore[attr-defined]
                    timeout=TIMEOUT_MS)
    assert window.live.runs[run_id].algo == "dqn"


def test_a_screenshot_of_the_window_is_not_blank(qtbot: object, window: viewer_qt.MainWindow,
                                                 stack: Stack, taxi_run: str,
                                                 tmp_path: Path) -> None:
    tab = window.open_tab(taxi_run)
    window.tabs.setCurrentWidget(tab)
    qtbot.waitUntil(lambda: tab.grid.scene is not None,  # type: ignore[attr-defined]
                    timeout=TIMEOUT_MS)
    tab.update_view(force=True)
    path = tmp_path / "viewer.png"
    assert window.grab().save(str(path))
    assert path.stat().st_size > 10_000
    from PySide6 import QtGui

    image = QtGui.QImage(str(path))
    assert (image.width(), image.height()) == (window.width(), window.height())
    colours = {image.pixel(x, y) for x in range(0, image.width(), 4)
               for y in range(0, image.height(), 4)}
    assert len(colours) > 20, f"{len(colours)} colours: the screenshot looks blank"
    shots = os.environ.get("GYMBUS_SCREENSHOTS")  # keep a copy to look at
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        image.save(str(Path(shots) / "viewer.png"))


def test_garbage_is_collected_on_the_gui_thread_only(qtbot: object,
                                                     window: viewer_qt.MainWindow) -> None:
    """A cycle dropped on another thread is not collected there (a Qt object in it would be
    destroyed off the GUI thread, which can deadlock the viewer), but by the window's timer."""
    import gc
    import threading
    import weakref

    from PySide6 import QtCore

    class Holder:
        pass

    died_on: list[str] = []
    holder = Holder()
    holder.me = holder  # type: ignore[attr-defined]  # a cycle: only the collector frees it
    holder.qt = QtCore.QObject()  # type: ignore[attr-defined]
    watch = weakref.ref(holder, lambda _: died_on.append(threading.current_thread().name))
    handed = [holder]
    del holder

    def drop_and_allocate() -> None:
        handed.clear()
        junk = [[i] for i in range(50_000)]  # far past gen0's threshold: a collection, if on
        del junk

    assert not gc.isenabled()
    thread = threading.Thread(target=drop_and_allocate, name="not-the-gui")
    thread.start()
    thread.join()
    assert watch() is not None and died_on == []
    qtbot.waitUntil(lambda: bool(died_on), timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
    assert died_on == [threading.main_thread().name]
    window.shutdown()
    assert gc.isenabled()
