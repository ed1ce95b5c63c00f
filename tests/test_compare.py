"""`gymbus compare`: rliable's numbers on the same scores, runs grouped by configuration, and the
whole path through a real stack (two configurations x three seeds, table, JSON and PNG)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics

from gymbus.services.analysis import compare as model
from gymbus.services.analysis import stats
from gymbus.services.stack.launcher import Stack
from tests.conftest import STACK_ENV, gymbus_cli, gymbus_cli_json, stack_fixture, stored_run

REPS = 300


def scores(seed: int, runs: int, *extra: int) -> stats.Array:
    return np.random.default_rng(seed).normal(1.0, 0.5, size=(runs, 1, *extra))


# --- the numbers, against rliable's own and against a hand computation -----------------------


def test_final_aggregates_are_rliable_s_point_estimates_and_intervals() -> None:
    finals = {"A": scores(1, 5), "B": scores(2, 7), "C": scores(3, 3)}
    ours = stats.interval_estimates(finals, stats.final_aggregates, REPS, seed=7)
    # rliable itself, one aggregate at a time, from the same seed: the same resamples
    for i, func in enumerate((metrics.aggregate_mean, np.median, metrics.aggregate_iqm)):
        np.random.seed(7)
        points, intervals = rly.get_interval_estimates(
            finals, lambda x, f=func: np.array([f(x)]), reps=REPS)
        for key in finals:
            assert ours[key].value[i] == pytest.approx(float(points[key][0]), abs=1e-12)
            assert ours[key].low[i] == pytest.approx(float(intervals[key][0][0]), abs=1e-9)
            assert ours[key].high[i] == pytest.approx(float(intervals[key][1][0]), abs=1e-9)
    # a different seed draws different resamples
    other = stats.interval_estimates(finals, stats.final_aggregates, REPS, seed=8)
    assert other["B"].low[2] != ours["B"].low[2]
    assert other["B"].value[2] == ours["B"].value[2]


def test_iqm_and_its_interval_match_a_hand_computation() -> None:
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0])
    # the middle half of 8 sorted scores: 2, 3, 4, 5
    assert stats.final_aggregates(values[:, None])[2] == pytest.approx(3.5)
    assert stats.final_aggregates(values[:, None])[1] == pytest.approx(3.5)
    assert stats.final_aggregates(values[:, None])[0] == pytest.approx(121 / 8)
    # the percentile bootstrap by hand: resample the runs (one stratum: one task), take the
    # 2.5th and 97.5th percentiles of the IQMs
    data = scores(5, 6)
    rng = np.random.default_rng(11)
    boot = [stats.final_aggregates(data[rng.integers(0, len(data), len(data))])[2]
            for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    ours = stats.interval_estimates({"x": data}, stats.final_aggregates, 2000, seed=3)["x"]
    assert ours.low[2] == pytest.approx(low, abs=0.08)
    assert ours.high[2] == pytest.approx(high, abs=0.08)
    assert ours.low[2] < ours.value[2] < ours.high[2]


def test_the_curve_band_is_rliable_s_iqm_per_point() -> None:
    curves = {"A": scores(4, 5, 12), "B": scores(6, 4, 12)}
    ours = stats.interval_estimates(curves, stats.iqm_per_point, 200, seed=2)
    np.random.seed(2)
    points, intervals = rly.get_interval_estimates(
        curves, lambda s: np.array([metrics.aggregate_iqm(s[..., j])
                                    for j in range(s.shape[-1])]), reps=200)
    for key in curves:
        np.testing.assert_allclose(ours[key].value, points[key], atol=1e-12)
        np.testing.assert_allclose(ours[key].low, intervals[key][0], atol=1e-9)
        np.testing.assert_allclose(ours[key].high, intervals[key][1], atol=1e-9)


def test_seeding_leaves_numpy_s_global_generator_as_it_was() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    stats.interval_estimates({"a": scores(1, 4)}, stats.final_aggregates, 50, seed=9)
    assert np.random.random() == expected


def test_curves_interpolate_smoothed_returns_at_steps_every_run_covers() -> None:
    returns = np.array([0.0, 1.0, 1.0, 0.0])
    assert stats.smoothed(returns, 2).tolist() == [0.0, 0.5, 1.0, 0.5]
    assert stats.smoothed(returns, 1).tolist() == returns.tolist()
    ends = [np.array([10.0, 20.0, 30.0]), np.array([5.0, 25.0, 40.0])]
    grid = stats.common_steps(ends, 5)
    assert grid.tolist() == [10.0, 15.0, 20.0, 25.0, 30.0]
    assert stats.curve_at(ends[1], np.array([0.0, 1.0, 2.0]), grid)[1] == pytest.approx(0.5)
    assert stats.final_score(np.arange(10.0), 3) == pytest.approx(8.0)
    assert stats.final_score(np.arange(2.0), 100) == pytest.approx(0.5)


def test_runs_differing_only_in_seed_name_and_tags_are_one_configuration() -> None:
    base = {"env": "FrozenLake-v1", "algo": "q_learning", "agent": {"learning_rate": 0.5}}
    def run(i: int, **config: Any) -> model.RunEpisodes:
        return model.RunEpisodes(f"r{i}", {**base, **config}, np.ones(3), np.arange(1.0, 4.0))
    confs = model.configurations([
        run(0, seed=0, name="a", tags={"x": "1"}), run(1, seed=1, name="b"),
        run(2, seed=0, agent={"learning_rate": 0.05}), run(3, seed=2, group="g")])
    assert [(c.label, [r.run_id for r in c.runs]) for c in confs] == [
        ("A", ["r0", "r1", "r3"]), ("B", ["r2"])]
    assert [c.describe for c in confs] == ["agent.learning_rate=0.5",
                                           "agent.learning_rate=0.05"]
    assert model.describe([base]) == ["FrozenLake-v1 q_learning"]


def test_select_takes_run_ids_and_groups_and_names_what_matches_nothing() -> None:
    records = [{"run_id": "r1", "group": "g"}, {"run_id": "r2", "group": "g"},
               {"run_id": "r3", "group": ""}, {"run_id": "r4", "config": {"group": "h"}}]
    assert [r["run_id"] for r in model.select(["r3", "g", "r1"], records)] == ["r3", "r1", "r2"]
    assert [r["run_id"] for r in model.select(["h"], records)] == ["r4"]
    with pytest.raises(model.NotFound, match="'nope' is neither a run id nor a group id"):
        model.select(["nope"], records)


def synthetic(seeds: int = 3) -> list[model.Configuration]:
    """Two configurations of `seeds` runs, one learning faster than the other."""
    runs = []
    for lr, top in ((0.5, 1.0), (0.05, 0.4)):
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            ends = np.cumsum(rng.integers(5, 30, 300)).astype(np.float64)
            returns = top * (1 - np.exp(-ends / 2000)) + rng.normal(0, 0.1, 300)
            runs.append(model.RunEpisodes(f"lr{lr}-{seed}", {
                "env": "FrozenLake-v1", "algo": "q_learning", "seed": seed,
                "agent": {"learning_rate": lr}}, returns, ends))
    return model.configurations(runs)


def test_the_qt_comparison_view_draws_a_curve_and_band_per_configuration(
        qtbot: Any, tmp_path: Path) -> None:
    pytest.importorskip("PySide6", reason="the Qt viewer is an optional extra")
    pg = pytest.importorskip("pyqtgraph", reason="the Qt viewer is an optional extra")
    from gymbus.services.viewers.qt.compare import CompareWindow
    from gymbus.services.viewers.qt.requests import Requests
    from gymbus.shared import settings as settings_mod

    requests = Requests()
    window = CompareWindow(settings_mod.load({"GYMBUS_HOME": str(tmp_path)}), requests)
    qtbot.addWidget(window)
    try:
        result = model.compare(synthetic(), reps=200)
        window.show_result(result)
        items = window.plot.getPlotItem().items
        bands = [i for i in items if isinstance(i, pg.FillBetweenItem)]
        named = [i.name() for i in items if isinstance(i, pg.PlotDataItem) and i.name()]
        assert len(bands) == 2
        assert named == ["A: agent.learning_rate=0.5 (3 runs)",
                         "B: agent.learning_rate=0.05 (3 runs)"]
        assert len(window.legend.items) == 2
        text = window.summary.text()
        assert "A  final IQM" in text and "B  final IQM" in text
        window.show()
        window.grab().save(str(tmp_path / "compare.png"))
        assert (tmp_path / "compare.png").stat().st_size > 10_000
    finally:
        requests.close()


# --- through the stack: two configurations x three seeds ---------------------------------------

stack = stack_fixture("compare", **STACK_ENV)
GROUP = "cmp-lr"
EPISODES = 120


@pytest.fixture(scope="module")
def sweep(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[float, list[str]]:
    """Six completed runs of one group: learning rates 0.5 and 0.01, seeds 0-2."""
    folder = tmp_path_factory.mktemp("runfiles")
    runs: dict[float, list[str]] = {}
    for lr in (0.5, 0.01):
        for seed in range(3):
            path = folder / f"lr{lr}-s{seed}.toml"
            path.write_text(
                f'env = "FrozenLake-v1"\nalgo = "q-learning"\nepisodes = {EPISODES}\n'
                f'seed = {seed}\ntelemetry = "fast"\ngroup = "{GROUP}"\nname = "s{seed}"\n'
                f'env_kwargs = {{is_slippery = false}}\n'
                f"agent = {{learning_rate = {lr}, epsilon_decay = 0.3}}\n", "utf-8")
            reply = gymbus_cli_json(stack.process_env(), "submit", str(path))
            runs.setdefault(lr, []).append(reply["run_id"])
    for run_id in (r for ids in runs.values() for r in ids):
        stored_run(stack, run_id, timeout=90)
    return runs


def _final_scores(stack: Stack, run_ids: list[str], last: int) -> stats.Array:
    rows = gymbus_cli_json(stack.process_env(), "query", model.episodes_sql(run_ids))
    by_run: dict[str, list[float]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(row["return"])
    return np.array([[np.mean(by_run[r][-last:])] for r in run_ids])


@pytest.mark.integration
def test_compare_a_group_gives_rliable_s_numbers_per_configuration(
        stack: Stack, sweep: dict[float, list[str]]) -> None:
    result = gymbus_cli_json(stack.process_env(), "compare", GROUP, "--last", "50",
                             "--reps", "500", "--seed", "4", timeout=120)
    confs = result["configurations"]
    assert [sorted(r["run_id"] for r in c["runs"]) for c in confs] == [
        sorted(sweep[0.5]), sorted(sweep[0.01])]
    assert [c["describe"] for c in confs] == ["agent.learning_rate=0.5",
                                              "agent.learning_rate=0.01"]
    finals = {c["label"]: _final_scores(stack, [r["run_id"] for r in c["runs"]], 50)
              for c in confs}
    np.random.seed(4)
    points, intervals = rly.get_interval_estimates(
        finals, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=500)
    for c in confs:
        iqm = c["final"]["iqm"]
        assert iqm["value"] == pytest.approx(float(points[c["label"]][0]), abs=1e-12)
        assert iqm["low"] == pytest.approx(float(intervals[c["label"]][0][0]), abs=1e-9)
        assert iqm["high"] == pytest.approx(float(intervals[c["label"]][1][0]), abs=1e-9)
        assert c["final"]["mean"]["value"] == pytest.approx(float(finals[c["label"]].mean()))
        curve = c["curve"]
        assert len(curve["steps"]) == 50 and curve["steps"] == sorted(curve["steps"])
        assert all(lo <= v <= hi for lo, v, hi in
                   zip(curve["low"], curve["iqm"], curve["high"], strict=True))
    # the viewer's comparison window computes the same, on its request thread
    pytest.importorskip("pyqtgraph", reason="the Qt viewer is an optional extra")
    from gymbus.services.viewers.qt.compare import compute

    seen = compute(stack.settings, [GROUP])
    assert [[r["run_id"] for r in c["runs"]] for c in seen["configurations"]] == \
        [[r["run_id"] for r in c["runs"]] for c in confs]


@pytest.mark.integration
def test_compare_prints_a_table_in_80_columns_and_draws_a_png(
        stack: Stack, sweep: dict[float, list[str]], tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    result = gymbus_cli(stack.process_env(), "compare", *sweep[0.5], *sweep[0.01][:2],
                        "--reps", "200", "--plot", str(png), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert "2 configuration(s)" in lines[0]
    assert any(line.split()[:2] == ["A", "3"] for line in lines)
    assert any(line.split()[:2] == ["B", "2"] for line in lines)
    assert sum(1 for line in lines if line.split()[:1] == ["IQM"]
               or line.split()[1:2] == ["IQM"]) >= 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.integration
def test_compare_names_what_it_cannot_find(stack: Stack) -> None:
    result = gymbus_cli(stack.process_env(), "compare", "no-such-group", "--json")
    assert result.returncode == 4
    assert "'no-such-group' is neither a run id nor a group id" in \
        json.loads(result.stdout)["error"]["message"]
