"""Sweeps: a sweep file expanded into one run per point (seeds, a grid, random samples, a command
run's placeholders), its errors naming the field, and `gymbus sweep` through a real stack: one
group, tags per point, no duplicates on a second submit with the same key, and `--wait`'s exit
code saying whether every run completed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_HEARTBEATS, gymbus_cli, make_stack, store_query

from gymbus.services.cli.durations import parse_duration
from gymbus.services.cli.sweep import group_line
from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.errors import ConfigError, ExitCode
from gymbus.shared.sweeps import parse_sweep

LAKE_RUN = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 30, "telemetry": "fast"}


def lake_sweep(**extra: Any) -> dict[str, Any]:
    return {"run": dict(LAKE_RUN), "seeds": {"start": 0, "count": 5},
            "grid": {"agent": {"learning_rate": [0.05, 0.1, 0.2]}}, **extra}


# --- expansion ----------------------------------------------------------------------------------


def test_seeds_times_a_grid_make_one_tagged_run_config_per_point() -> None:
    points = parse_sweep(lake_sweep()).points()
    assert len(points) == 15
    made = {(p.config["seed"], p.config["agent"]["learning_rate"]) for p in points}
    assert made == {(s, lr) for s in range(5) for lr in (0.05, 0.1, 0.2)}
    assert points[4].config["tags"] == {"seed": "1", "agent.learning_rate": "0.1"}
    assert [p.index for p in points] == list(range(15))


def test_samples_are_drawn_within_bounds_and_again_the_same_with_their_seed() -> None:
    sample = {"n": 8, "seed": 3, "agent": {
        "learning_rate": {"log_uniform": [0.01, 0.5]}, "gamma": {"uniform": [0.9, 0.99]},
        "epsilon_decay": {"choice": [0.3, 0.6]}}}
    raw = {"run": dict(LAKE_RUN), "sample": sample}
    first = [p.values for p in parse_sweep(json.loads(json.dumps(raw))).points()]
    again = [p.values for p in parse_sweep(json.loads(json.dumps(raw))).points()]
    other = [p.values for p in parse_sweep({**raw, "sample": {**sample, "seed": 4}}).points()]
    assert first == again and first != other and len(first) == 8
    for values in first:
        assert 0.01 <= values["agent.learning_rate"] <= 0.5
        assert 0.9 <= values["agent.gamma"] <= 0.99
        assert values["agent.epsilon_decay"] in (0.3, 0.6)
    assert len({v["agent.learning_rate"] for v in first}) == 8


def test_a_command_runs_axes_fill_its_placeholders_and_name() -> None:
    raw = {"run": {"command": ["python", "train.py", "--seed", "{seed}", "--lr={agent.lr}",
                               "{{literal}}"]},
           "name": "lr{agent.lr}-s{seed}-{index}", "seeds": [3, 4],
           "grid": {"agent": {"lr": [0.1]}}}
    points = parse_sweep(raw).points()
    assert [p.config["command"] for p in points] == [
        ["python", "train.py", "--seed", "3", "--lr=0.1", "{literal}"],
        ["python", "train.py", "--seed", "4", "--lr=0.1", "{literal}"]]
    assert [p.config["name"] for p in points] == ["lr0.1-s3-0", "lr0.1-s4-1"]
    assert "seed" not in points[0].config and "agent" not in points[0].config


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"grid": {"agent_lr": [0.1]}}, "grid.agent_lr", "unknown axis"),
    ({"grid": {"agent": {"learning_rate": []}}}, "grid.agent.learning_rate", "non-empty list"),
    ({"grid": {"agent": {"bogus": [1.0]}}}, "grid.agent.bogus", "unknown hyperparameter"),
    ({"grid": {"agent": {"learning_rate": [0.1, 7.0]}}}, "grid.agent.learning_rate",
     "between 0 and 1"),
    ({"seeds": []}, "seeds", "non-empty list"),
    ({"seeds": {"start": 0}}, "seeds.count", "integer >= 1"),
    ({"sample": {"seed": 0, "agent": {"gamma": {"uniform": [0.9, 0.99]}}}}, "sample.n", "number"),
    ({"sample": {"n": 2, "agent": {"gamma": {"log_uniform": [0.0, 1.0]}}}}, "sample.agent.gamma",
     "low > 0"),
    ({"sample": {"n": 2, "agent": {"gamma": {"normal": [0.0, 1.0]}}}}, "sample.agent.gamma",
     "expected one of uniform, log_uniform, choice"),
    ({"name": "lake-{lr}"}, "name", "bad placeholder {lr}"),
    ({"axes": {}}, "axes", "unknown sweep field"),
    ({"run": {}}, "run", "[run] table"),
])
def test_a_bad_sweep_is_refused_naming_the_field(change: dict[str, Any], field: str,
                                                 says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sweep(lake_sweep(**change)).points()
    assert caught.value.field == field and says in caught.value.message


@pytest.mark.parametrize(("command", "grid", "field", "says"), [
    (["python", "t.py", "--lr", "{lr}"], {"rate": [0.1]}, "run.command", "bad placeholder {lr}"),
    (["python", "t.py"], {"rate": [0.1]}, "grid.rate", "put {rate} in the command"),
    (["python", "t.py", "{rate"], {"rate": [0.1]}, "run.command", "unbalanced brace"),
])
def test_a_command_sweeps_placeholders_are_checked(command: list[str], grid: dict[str, Any],
                                                   field: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sweep({"run": {"command": command}, "grid": grid})
    assert caught.value.field == field and says in caught.value.message


def write_sweep(folder: Path, text: str, name: str = "sweep.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


LAKE_FILE = """
    key = "{key}"
    name = "lake-lr{{agent.learning_rate}}-s{{seed}}"
    seeds = [0, 1]
    [run]
    env = "FrozenLake-v1"
    algo = "q-learning"
    episodes = 40
    telemetry = "fast"
    tags = {{arm = "sweep-test"}}
    [grid]
    agent.learning_rate = [0.1, 0.2]
"""


def test_dry_run_prints_the_points_with_no_stack(tmp_path: Path) -> None:
    env = {**os.environ, **free_endpoints(tmp_path / "home")}  # nothing listens there
    path = write_sweep(tmp_path, LAKE_FILE.format(key="dry"))
    shown = gymbus_cli(env, "sweep", str(path), "--dry-run", "--json")
    assert shown.returncode == 0, shown.stderr
    points = json.loads(shown.stdout)
    assert [p["point"] for p in points] == [
        {"seed": s, "agent.learning_rate": lr} for s in (0, 1) for lr in (0.1, 0.2)]
    assert points[3]["config"]["name"] == "lake-lr0.2-s1"
    text = gymbus_cli(env, "sweep", str(path), "--dry-run")
    assert text.returncode == 0 and "4 run(s)" in text.stderr
    assert text.stdout.splitlines()[0].split() == ["#", "SEED", "AGENT.LEARNING_RATE", "NAME"]
    assert all(len(line) <= 80 for line in text.stdout.splitlines())


def test_a_bad_sweep_file_exits_2_with_the_field_in_json(tmp_path: Path) -> None:
    env = {**os.environ, **free_endpoints(tmp_path / "home")}
    path = write_sweep(tmp_path, LAKE_FILE.format(key="bad").replace("[0.1, 0.2]", "[]"))
    result = gymbus_cli(env, "sweep", str(path), "--json")
    assert result.returncode == ExitCode.BAD_INPUT
    error = json.loads(result.stdout)["error"]
    assert error["field"] == "grid.agent.learning_rate" and "non-empty" in error["message"]


# --- through a real stack -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A whole stack with one worker of 4 slots, which finds this interpreter as `python`."""
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    home = tmp_path_factory.mktemp("sweep") / "home"
    with make_stack(home, **FAST_HEARTBEATS, GYMBUS_WORKER_SLOTS="4", PATH=path) as s:
        s.start()
        yield s


def gymbus(stack: Stack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real `gymbus` command against the stack, from `cwd` (a command run's folder)."""
    return subprocess.run([sys.executable, "-m", "gymbus.services.cli", *args],
                          env=stack.process_env({"COLUMNS": "200"}), cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.integration
def test_a_sweep_runs_each_point_in_one_group_and_again_makes_no_duplicates(
        stack: Stack, tmp_path: Path) -> None:
    path = write_sweep(tmp_path, LAKE_FILE.format(key="lake-once"))
    result = gymbus(stack, "sweep", str(path), "--wait", "--json")
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    group = made["group"]
    assert len(made["runs"]) == 4 and {r["status"] for r in made["runs"]} == {"completed"}
    assert all(r["created"] for r in made["runs"])
    assert "sweep " + group in result.stderr and "4/4 done" in result.stderr

    listed = json.loads(gymbus(stack, "runs", "--group", group, "--json").stdout)
    assert sorted(r["run_id"] for r in listed) == sorted(r["run_id"] for r in made["runs"])
    by_id = {r["run_id"]: r for r in listed}
    ids = ", ".join(f"'{r['run_id']}'" for r in made["runs"])
    stored = {row["run_id"]: row["m"] for row in store_query(stack, (
        'SELECT run_id, avg("return") AS m FROM (SELECT run_id, "return", row_number() OVER '
        "(PARTITION BY run_id ORDER BY episode DESC) AS k FROM episodes WHERE run_id IN "
        f"({ids})) WHERE k <= 100 GROUP BY run_id"))}
    in_store = store_query(stack, "SELECT run_id, json_extract_string(config, '$.tags.seed') AS "
                           f"seed FROM runs WHERE json_extract_string(config, '$.group') = "
                           f"'{group}'")  # what export and compare find a group by
    assert {(r["run_id"], int(r["seed"])) for r in in_store} == {
        (r["run_id"], r["point"]["seed"]) for r in made["runs"]}
    for run in made["runs"]:
        row = by_id[run["run_id"]]
        lr, seed = run["point"]["agent.learning_rate"], run["point"]["seed"]
        assert row["group"] == group and row["name"] == f"lake-lr{lr}-s{seed}"
        assert row["tags"] == {"arm": "sweep-test", "seed": str(seed),
                               "agent.learning_rate": str(lr)}
        assert row["mean_return_last_100"] == pytest.approx(stored[run["run_id"]])
    one = made["runs"][0]["run_id"]
    status = json.loads(gymbus(stack, "status", one, "--json").stdout)
    assert status["group"] == group and status["tags"] == by_id[one]["tags"]
    shown = gymbus(stack, "status", one).stdout
    assert f"group  {group}" in shown and "arm=sweep-test" in shown

    evaluation = gymbus(stack, "submit", "--eval-from", one, "--episodes", "5", "--tag",
                        f"evaluates={one}", "--wait")
    assert evaluation.returncode == 0, evaluation.stderr
    table = gymbus(stack, "runs", "--tag", f"evaluates={one}").stdout.splitlines()
    header, row_line = table[0], table[1]
    column = header.index("ALGO")
    assert row_line[column:].startswith("eval:q-learning") and "MEAN RET" in header

    again = gymbus(stack, "sweep", str(path), "--json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["group"] == group and not any(r["created"] for r in second["runs"])
    assert [r["run_id"] for r in second["runs"]] == [r["run_id"] for r in made["runs"]]
    assert "0 run(s) queued, 4 already submitted" in again.stderr
    assert len(json.loads(gymbus(stack, "runs", "--group", group, "--json").stdout)) == 4


FAILS_FOR_SEED_1 = """
    import sys, gymnasium as gym, gymbus
    seed = int(sys.argv[sys.argv.index("--seed") + 1])
    if seed == 1:
        sys.exit(3)
    with gymbus.run(name="lake", config={"env": "FrozenLake-v1"}, telemetry="fast") as run:
        env = run.record(gym.make("FrozenLake-v1"))
        env.reset(seed=seed)
        for _ in range(20):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
"""


@pytest.mark.integration
def test_sweep_wait_exits_1_when_a_command_run_fails(stack: Stack, tmp_path: Path) -> None:
    write_sweep(tmp_path, FAILS_FOR_SEED_1, name="train.py")
    path = write_sweep(tmp_path, """
        seeds = [0, 1]
        [run]
        command = ["python", "train.py", "--seed", "{seed}"]
    """)
    result = gymbus(stack, "sweep", str(path), "--wait", "--json", cwd=tmp_path)
    assert result.returncode == ExitCode.RUN_NOT_COMPLETED, result.stderr
    made = json.loads(result.stdout)
    runs = {r["point"]["seed"]: r for r in made["runs"]}
    assert (runs[0]["status"], runs[1]["status"]) == ("completed", "failed")
    assert "1 of the sweep's 2 runs did not complete" in result.stderr
    everywhere = json.loads(gymbus(stack, "runs", "--tag", "seed=1", "--json").stdout)
    assert len(everywhere) > 1  # the other sweep's seed-1 runs too
    listed = json.loads(gymbus(stack, "runs", "--tag", "seed=1", "--group", made["group"],
                               "--json").stdout)
    assert [r["run_id"] for r in listed] == [runs[1]["run_id"]]
    assert listed[0]["status"] == "failed"


def test_the_example_sweep_file_expands_to_its_documented_points() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"
    spec = parse_sweep(tomllib.loads(example.read_text()))
    points = spec.points()
    assert len(points) == 3 * 3 * 2 and spec.key == "examples-lake-lr"
    assert len({p.config["name"] for p in points}) == len(points)
    assert all(p.config["tags"]["study"] == "lake-lr" for p in points)
    docs = (example.parents[1] / "docs" / "sweeps.md").read_text()
    blocks = [b.split("```")[0] for b in docs.split("```toml\n")[1:]]
    documented = [tomllib.loads(b) for b in blocks if "examples-lake-lr" in b]
    assert documented == [tomllib.loads(example.read_text())]  # the docs show the example


def test_the_progress_line_counts_states_and_estimates_from_the_pace() -> None:
    states = ["completed"] * 3 + ["failed", "lost", "running", "dispatched"] + ["queued"] * 3
    records = [{"run_id": str(i), "state": s} for i, s in enumerate(states)]
    line = group_line(records, 10, started=0.0, now=50.0, group="g")
    # 5 ended in 50 s: 10 s a run, 5 to go
    assert line == "sweep g: 3/10 done, 2 failed, 2 running, 3 queued, ETA 50s"
    assert group_line(records[5:], 5, 0.0, 1.0, "g").endswith("ETA -")  # no pace yet


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), ("1h30m", 5400.0),
    ("1d", 86400.0), ("0.5", 0.5)])
def test_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 m", "1h30", "-3", "0", "inf", "2x"])
def test_a_bad_duration_says_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="duration|more than 0"):
        parse_duration(text)
