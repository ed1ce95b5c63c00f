"""A Belief-Desire-Intention agent for grid worlds: AgentSpeak plans decide, a Q-learner learns.

The plans (an `.asl` file run by the `agentspeak` interpreter) choose how the agent acts, and
the choice holds until the next decision point: the start of an episode, and every step onto
or off the cached route. Between decision points the agent acts in Python: the interpreter
costs ~40 µs a call, about twenty tabular steps, so that deciding at every step would make a
BDI run an order of magnitude slower than Q-learning (docs/agents.md has the measurements).

Ways to act (the plan actions): `.follow_route` (the action the cached route took in this
cell), `.explore` (the Q-learner, epsilon-greedy) and `.exploit` (the Q-learner, greedy). The
Q-learner learns from every step, whichever way chose it. Events: `!goal_reached` after the
goal, `!fell_in_hole(Row, Col)` after a hole (or the cliff), where `.cache_route` and
`.drop_route` keep or forget a route. Each step's label is the plan that chose the way, with
the Q-learner's own choice after a colon (`follow_route`, `explore:random`, `explore:greedy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import agentspeak
import agentspeak.runtime
import gymnasium as gym
import numpy as np
from agentspeak import GoalType, Literal, Trigger

from gymbus.shared.policy_files import BDI_MEMORY_FILE, POLICY_FILES
from gymbus.shared.runconfig import BdiParams
from gymbus.worker.agents import asl
from gymbus.worker.agents.base import Agent, Artifact, Budget, MetricSink
from gymbus.worker.agents.qlearning import QLearningAgent

FOLLOW_ROUTE = "follow_route"
EXPLORE = "explore"
EXPLOIT = "exploit"
DECIDE = "+!decide/0"
GOAL_REACHED = "+!goal_reached/0"
FELL_IN_HOLE = "+!fell_in_hole/2"
MEMORY_FORMAT = "gymbus.bdi.v1"
#: what the Q-learner's labels become after a plan's label
_Q_CHOICE = {"explore": "random", "exploit": "greedy"}

#: (row, column) moves of each action, by environment
_FROZEN_LAKE_MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0))  # left, down, right, up
_CLIFF_MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # up, right, down, left


@dataclass(frozen=True)
class Grid:
    """The layout an agent may know beforehand: size, goal, and where each action means to go."""

    nrow: int
    ncol: int
    goal: tuple[int, int]
    moves: tuple[tuple[int, int], ...]
    #: a reward at or below this means the cliff (sent back to the start, not terminal)
    cliff_reward: float | None = None

    def cell(self, state: int) -> tuple[int, int]:
        row, col = divmod(int(state), self.ncol)
        return row, col

    def target(self, state: int, action: int) -> tuple[int, int]:
        """The cell `action` means to reach from `state` (a slip may end elsewhere)."""
        row, col = self.cell(state)
        dr, dc = self.moves[action]
        return min(max(row + dr, 0), self.nrow - 1), min(max(col + dc, 0), self.ncol - 1)

    @classmethod
    def of(cls, env: gym.Env[Any, Any]) -> Grid:
        """The grid of a FrozenLake (any map) or CliffWalking environment."""
        inner: Any = env.unwrapped
        desc = getattr(inner, "desc", None)
        if desc is not None:
            rows, cols = np.nonzero(np.asarray(desc) == b"G")
            if len(rows) != 1:
                raise ValueError("bdi needs a FrozenLake map with exactly one goal (G)")
            return cls(int(inner.nrow), int(inner.ncol), (int(rows[0]), int(cols[0])),
                       _FROZEN_LAKE_MOVES)
        if hasattr(inner, "_cliff") and hasattr(inner, "shape"):
            nrow, ncol = (int(n) for n in inner.shape)
            return cls(nrow, ncol, (nrow - 1, ncol - 1), _CLIFF_MOVES, cliff_reward=-100.0)
        raise ValueError(f"bdi needs a grid world (FrozenLake or CliffWalking), not {inner}")


@dataclass
class Memory:
    """What the plans keep across episodes, saved as `bdi_memory.json` beside the Q-table."""

    #: state -> the action the cached route took there
    route: dict[int, int] = field(default_factory=dict)
    route_return: float | None = None
    #: routes dropped because they led into a hole
    route_drops: int = 0
    holes: set[tuple[int, int]] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {"format": MEMORY_FORMAT, "route": sorted([s, a] for s, a in self.route.items()),
                "route_return": self.route_return, "route_drops": self.route_drops,
                "holes": sorted([r, c] for r, c in self.holes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Memory:
        """A Memory from `to_json`'s output ({} gives an empty one); ValueError if malformed."""
        if not data:
            return cls()
        if data.get("format") != MEMORY_FORMAT:
            raise ValueError(f"{BDI_MEMORY_FILE}: expected format {MEMORY_FORMAT!r}, "
                             f"got {data.get('format')!r}")
        try:
            ret = data.get("route_return")
            return cls({int(s): int(a) for s, a in data.get("route", [])},
                       None if ret is None else float(ret), int(data.get("route_drops", 0)),
                       {(int(r), int(c)) for r, c in data.get("holes", [])})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{BDI_MEMORY_FILE} is malformed: {exc}") from None


class BdiAgent:
    """Plans decide at decision points; a QLearningAgent (sharing this agent's params) learns.

    With `evaluating`, the agent learns and remembers nothing: the Q-learner only acts
    greedily, `.cache_route` and `.drop_route` change nothing, and the plans see `evaluating`.
    """

    has_labels = True
    learns = True  # an evaluating agent still perceives: its beliefs follow the walk
    draw: Callable[[], Any] | None = None

    def __init__(
        self,
        params: BdiParams,
        env: gym.Env[Any, Any],
        budget: Budget,
        rng: np.random.Generator,
        sink: MetricSink,
        *,
        memory: Memory | None = None,
        learner: QLearningAgent | None = None,
        evaluating: bool = False,
    ) -> None:
        self.grid = Grid.of(env)
        self.params = params
        self.q_learner = learner or QLearningAgent(
            params, env.observation_space, env.action_space, budget, rng, sink)
        self.memory = memory if memory is not None else Memory()
        self.evaluating = evaluating
        self._env, self._budget, self._rng, self._sink = env, budget, rng, sink
        self.plans = asl.load_plans(asl.plan_path(params.plans), self._actions(), [DECIDE])
        self._asl = self.plans.agent
        self._believe("goal", self.grid.goal)
        if evaluating:
            self._believe("evaluating", ())
        self.mode = EXPLORE
        self.label: str | None = None
        self._plan_label = EXPLORE
        self._chosen: tuple[str, str] | None = None
        self._decide = True
        self._on_route = False
        self._state = 0
        self._trajectory: list[tuple[int, int]] = []
        self._return = 0.0
        self._last_reward = 0.0
        self._episode = 0
        self._explore_episode = False
        self.decisions = 0
        self._holes_seen = -1

    # --- the Agent interface --------------------------------------------------------------------

    def begin_episode(self, episode: int, global_step: int) -> None:
        if not self.evaluating:
            self.q_learner.begin_episode(episode, global_step)
            self._explore_episode = bool(self._rng.random() < self.q_learner.epsilon)
        self._episode = episode
        self._trajectory.clear()
        self._return = self._last_reward = 0.0
        self._decide = True
        self.decisions = 0

    def act(self, obs: Any) -> int:
        state = int(obs)
        on_route = state in self.memory.route
        if self._decide or on_route != self._on_route:
            self._on_route = on_route
            self._deliberate(state)
        if self.mode == FOLLOW_ROUTE and on_route:
            self.label = self._plan_label
            return self.memory.route[state]
        if self.mode == EXPLORE and not self.evaluating:
            action = self.q_learner.act(state)
            self.label = f"{self._plan_label}:{_Q_CHOICE[self.q_learner.label or 'exploit']}"
            return action
        self.label = self._plan_label
        return self.q_learner.greedy_action(state)

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        if not self.evaluating:
            self.q_learner.learn(obs, action, reward, next_obs, terminated, truncated)
        state, grid = int(obs), self.grid
        self._trajectory.append((state, action))
        self._return += reward
        self._last_reward = reward
        if terminated and grid.cell(next_obs) == grid.goal:
            self._post(GOAL_REACHED, Literal("goal_reached"), next_obs)
        elif grid.cliff_reward is not None and reward <= grid.cliff_reward:
            self._fell(grid.target(state, action), next_obs)
        elif terminated:
            self._fell(grid.cell(next_obs), next_obs)

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        if self.evaluating:
            self._sink.metric("charts/epsilon", global_step, 0.0)
        else:
            self.q_learner.end_episode(episode, global_step, ret, length)
        self._sink.metric("bdi/decisions", global_step, self.decisions)

    def load_table(self, table: np.ndarray) -> None:
        self.q_learner.load_table(table)

    def artifacts(self) -> list[Artifact]:
        """`bdi_memory.json` (route, holes, routes dropped), then `q_table.npy`."""
        if self.evaluating:
            return []
        memory = {**self.memory.to_json(), "plans": str(self.plans.path)}
        return [Artifact("bdi_memory", BDI_MEMORY_FILE, "json", memory),
                Artifact("q_table", POLICY_FILES["bdi"], "npy", self.q_learner.table())]

    def evaluator(self) -> Agent:
        """The same plans, acting greedily on this agent's Q-learner and memory (shared)."""
        if self.evaluating:
            return self
        return BdiAgent(self.params, self._env, self._budget, self._rng, self._sink,
                        memory=self.memory, learner=self.q_learner, evaluating=True)

    # --- deliberation ---------------------------------------------------------------------------

    def _deliberate(self, state: int) -> None:
        """Post !decide and run the interpreter until the chosen plan has intended a way."""
        self._chosen = None
        self._run(Literal("decide"), state)
        if self._chosen is None:
            raise asl.PlanError(f"{self.plans.path}: the plan for +!decide chose no way to act; "
                                "it must call .follow_route, .explore or .exploit")
        self.mode, self._plan_label = self._chosen
        self._believe("intending", (Literal(self.mode),))
        self._decide = False
        self.decisions += 1

    def _fell(self, cell: tuple[int, int], next_obs: Any) -> None:
        if not self.evaluating:
            self.memory.holes.add(cell)
        self._post(FELL_IN_HOLE, Literal("fell_in_hole", cell), next_obs)
        self._decide = True  # on the cliff the episode goes on, from the start

    def _post(self, trigger: str, goal: Literal, next_obs: Any) -> None:
        """Post an event goal if the plans handle it; no applicable plan means nothing to do."""
        if trigger not in self.plans.triggers:
            return
        self._believe("episode_return", (self._return,))
        try:
            self._run(goal, int(next_obs))
        except asl.PlanError as exc:
            if "no applicable plan" not in str(exc):
                raise

    def _run(self, goal: Literal, state: int) -> None:
        self._perceive(state)
        agent = self._asl
        try:
            agent.call(Trigger.addition, GoalType.achievement, goal, agentspeak.runtime.Intention())
            while agent.step():
                pass
        except (agentspeak.AslError, agentspeak.AggregatedError) as exc:
            agent.intentions.clear()
            detail = self.plans.errors() or str(exc)
            raise asl.PlanError(f"{self.plans.path}: !{goal} failed in state {state} "
                                f"(episode {self._episode}): {detail}") from None

    def _perceive(self, state: int) -> None:
        """Refresh the beliefs that come from the environment and from memory."""
        memory = self.memory
        self._state = state
        self._believe("pos", self.grid.cell(state))
        self._believe("state", (state,))
        self._believe("last_reward", (self._last_reward,))
        self._believe("episode", (self._episode,))
        self._believe("route_drops", (memory.route_drops,))
        self._believe("route_action", None if state not in memory.route else (memory.route[state],))
        self._believe("route_cached", () if memory.route else None)
        ret = memory.route_return
        self._believe("route_return", None if ret is None else (ret,))
        self._believe("explore_episode", () if self._explore_episode else None)
        if len(memory.holes) != self._holes_seen:
            self._holes_seen = len(memory.holes)
            self._asl.beliefs[("hole", 2)] = {Literal("hole", cell) for cell in memory.holes}

    def _believe(self, functor: str, args: tuple[Any, ...] | None) -> None:
        """Replace the one belief `functor(args...)`, or remove it when `args` is None."""
        if args is None:
            self._asl.beliefs.pop((functor, 0), None)
            self._asl.beliefs.pop((functor, 1), None)
        else:
            self._asl.beliefs[(functor, len(args))] = {Literal(functor, args)}

    # --- the plan actions -----------------------------------------------------------------------

    def _actions(self) -> agentspeak.Actions:
        actions = asl.new_actions()
        for way in (FOLLOW_ROUTE, EXPLORE, EXPLOIT):
            actions.add("." + way, 0, self._intend(way))
        actions.add(".cache_route", 0, self._memory_action(self._cache_route))
        actions.add(".drop_route", 0, self._memory_action(self._drop_route))
        return actions

    def _intend(self, way: str) -> Callable[..., Iterator[None]]:
        def action(agent: Any, term: Any, intention: Any) -> Iterator[None]:
            if way == FOLLOW_ROUTE and self._state not in self.memory.route:
                raise agentspeak.AslError(".follow_route: this cell is not on a cached route "
                                          "(test route_action(_) in the plan's context)")
            self._chosen = (way, self.plans.labels.get(id(intention.instr), way))
            yield

        return action

    def _memory_action(self, change: Callable[[], None]) -> Callable[..., Iterator[None]]:
        def action(agent: Any, term: Any, intention: Any) -> Iterator[None]:
            if not self.evaluating:
                change()
            yield

        return action

    def _cache_route(self) -> None:
        self.memory.route = dict(self._trajectory)  # the last action taken in each cell
        self.memory.route_return = self._return

    def _drop_route(self) -> None:
        self.memory.route = {}
        self.memory.route_return = None
        self.memory.route_drops += 1
