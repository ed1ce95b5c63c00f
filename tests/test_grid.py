"""Grid worlds drawn from observations: FrozenLake maps, Taxi's decoding and walls, CliffWalking."""

from __future__ import annotations

import gymnasium as gym
import pytest

from gymbus.services.viewers.grid import (
    TAXI_STANDS,
    GridWorld,
    action_name,
    decode_taxi,
    family_of,
    to_rich,
    to_text,
)


def world(env_id: str, **kwargs: object) -> GridWorld:
    w = GridWorld.for_env(env_id, dict(kwargs))
    assert w is not None
    return w


def test_frozenlake_4x4_places_the_agent_from_the_observation() -> None:
    w = world("FrozenLake-v1")
    assert w.board == ("SFFF", "FHFH", "FFFH", "HFFG")
    scene = w.scene(5)
    assert scene.agent == (1, 1)
    assert scene.kind(1, 1) == "hole"
    assert "fell in a hole" in scene.caption()
    lines = to_text(scene).splitlines()
    assert lines[1].split() == ["F", "[H]", "F", "H"]
    assert "reached the goal" in world("FrozenLake-v1").scene(15).caption()


def test_frozenlake_8x8_by_map_name_and_by_env_id() -> None:
    by_name = world("FrozenLake-v1", map_name="8x8")
    by_id = world("FrozenLake8x8-v1")
    assert by_name.board == by_id.board
    assert len(by_id.board) == 8 and all(len(row) == 8 for row in by_id.board)
    scene = by_id.scene(63)
    assert scene.agent == (7, 7) and scene.kind(7, 7) == "goal"


def test_a_custom_map_wins_over_the_map_name() -> None:
    desc = ["SFH", "FFF", "HFG"]
    w = world("FrozenLake-v1", desc=desc, map_name="8x8")
    assert w.board == tuple(desc)
    assert w.scene(2).kind(0, 2) == "hole"
    with pytest.raises(ValueError):
        w.scene(9)
    env = gym.make("FrozenLake-v1", desc=desc, is_slippery=False)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(2)  # RIGHT
    assert w.scene(int(obs)).agent == (0, 1)
    with pytest.raises(ValueError):
        world("FrozenLake-v1", desc=["SFX"])


def test_taxi_states_decode_as_gymnasium_encodes_them() -> None:
    env = gym.make("Taxi-v4").unwrapped
    w = world("Taxi-v4")
    for state in range(500):
        row, col, passenger, dest = decode_taxi(state)
        assert [row, col, passenger, dest] == list(env.decode(state))  # type: ignore[attr-defined]
        scene = w.scene(state)
        assert scene.agent == (row, col)
        assert scene.carrying == (passenger == 4)
        assert scene.passenger == (None if passenger == 4 else TAXI_STANDS[passenger])
        assert scene.destination == TAXI_STANDS[dest]
    assert [tuple(loc) for loc in env.locs] == list(TAXI_STANDS)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        decode_taxi(500)


def test_taxi_board_has_its_walls_and_stands() -> None:
    w = world("Taxi-v4")
    assert w.walls == {(0, 1), (1, 1), (3, 0), (3, 2), (4, 0), (4, 2)}
    state = ((2 * 5 + 1) * 5 + 2) * 4 + 3  # taxi at (2, 1), passenger at Y, destination B
    scene = w.scene(state)
    text = to_text(scene)
    assert "passenger waiting at Y" in text and "destination B" in text
    assert text.splitlines()[0].startswith("+---")
    assert "| y " in text  # the waiting passenger's stand in lower case
    assert "[.]" in text.splitlines()[3]
    delivered = w.scene(((4 * 5 + 3) * 5 + 3) * 4 + 3)
    assert "delivered at B" in delivered.caption()
    styled = to_rich(scene)
    assert any("magenta" in str(span.style) for span in styled.spans)


def test_cliffwalking_start_cliff_and_goal() -> None:
    w = world("CliffWalking-v1")
    assert w.board[3] == "S" + "C" * 10 + "G"
    env = gym.make("CliffWalking-v1")
    obs, _ = env.reset(seed=0)
    assert w.scene(int(obs)).agent == (3, 0)
    obs, *_ = env.step(0)  # UP
    assert w.scene(int(obs)).agent == (2, 0)
    assert w.scene(int(obs)).kind(3, 5) == "cliff"
    assert world("CliffWalkingSlippery-v1").board == w.board


def test_other_environments_are_not_grid_worlds() -> None:
    assert GridWorld.for_env("CartPole-v1") is None
    assert family_of("FrozenLake8x8-v1") == "FrozenLake"
    assert action_name("FrozenLake-v1", 2) == "RIGHT"
    assert action_name("Taxi-v4", 4) == "PICKUP"
    assert action_name("CliffWalking-v1", 0) == "UP"
    assert action_name("CartPole-v1", 1) == "1"
