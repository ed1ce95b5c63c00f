"""Grid worlds drawn from observations: FrozenLake (any map), Taxi and CliffWalking, as text or data.

`GridWorld.for_env` reads an environment's layout once (the map of a FrozenLake, custom ones and
8x8 included); `GridWorld.scene(obs)` turns one integer observation into a `Scene`: the letters
of the board, where the agent is and, for Taxi, the passenger and the destination. The terminal
views print `to_text` / `to_rich`; the Qt view paints the same `Scene`. Pure functions, no thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

#: what each letter of a board is; the Qt view and `to_rich` colour by this
KINDS: dict[str, str] = {
    "S": "start", "F": "frozen", "H": "hole", "G": "goal",  # FrozenLake (and S, G elsewhere)
    "C": "cliff", ".": "path",  # CliffWalking ('.' is also Taxi's road)
    "R": "stand", "Y": "stand", "B": "stand", "g": "stand",  # Taxi's stands; 'g' drawn as G
}
STYLES: dict[str, str] = {
    "start": "bold", "frozen": "cyan", "hole": "bold blue", "goal": "bold green",
    "cliff": "bold red", "path": "dim", "stand": "bold",
}
TAXI_MAP = (
    "+---------+",
    "|R: | : :G|",
    "| : | : : |",
    "| : : : : |",
    "| | : | : |",
    "|Y| : |B: |",
    "+---------+",
)
TAXI_STANDS = ((0, 0), (0, 4), (4, 0), (4, 3))
TAXI_STAND_NAMES = ("R", "G", "Y", "B")
ACTIONS: dict[str, tuple[str, ...]] = {
    "FrozenLake": ("LEFT", "DOWN", "RIGHT", "UP"),
    "CliffWalking": ("UP", "RIGHT", "DOWN", "LEFT"),
    "Taxi": ("SOUTH", "NORTH", "EAST", "WEST", "PICKUP", "DROPOFF"),
}
CLIFF_SHAPE = (4, 12)


@dataclass(frozen=True)
class Scene:
    """One state of a grid world: the board's letters, the agent and Taxi's passenger."""

    family: str
    #: one string per row, one letter per cell (see KINDS)
    board: tuple[str, ...]
    agent: tuple[int, int]
    #: cells with a wall on their east side (Taxi)
    walls: frozenset[tuple[int, int]] = frozenset()
    #: Taxi: the stand where the passenger waits (None once in the taxi)
    passenger: tuple[int, int] | None = None
    destination: tuple[int, int] | None = None
    carrying: bool = False

    @property
    def rows(self) -> int:
        return len(self.board)

    @property
    def cols(self) -> int:
        return len(self.board[0])

    def letter(self, row: int, col: int) -> str:
        return self.board[row][col]

    def kind(self, row: int, col: int) -> str:
        return KINDS.get(self.board[row][col], "path")

    def caption(self) -> str:
        """One line saying what the board shows (where the agent stands, the passenger)."""
        r, c = self.agent
        where = f"agent at row {r}, col {c}"
        if self.family == "Taxi":
            if self.carrying:
                rider = "passenger in the taxi"
            elif self.passenger == self.destination:
                rider = f"passenger delivered at {_stand_name(self.passenger)}"
            else:
                rider = f"passenger waiting at {_stand_name(self.passenger)}"
            return f"taxi at row {r}, col {c}; {rider}; destination {_stand_name(self.destination)}"
        under = self.kind(r, c)
        if under == "hole":
            return where + ": fell in a hole"
        if under == "goal":
            return where + ": reached the goal"
        return where


def _stand_name(cell: tuple[int, int] | None) -> str:
    return TAXI_STAND_NAMES[TAXI_STANDS.index(cell)] if cell in TAXI_STANDS else "?"


def family_of(env_id: str) -> str | None:
    """The grid family of a Gymnasium id (FrozenLake8x8-v1 -> FrozenLake), or None."""
    for family in ACTIONS:
        if env_id.split("/")[-1].startswith(family):
            return family
    return None


def action_name(env_id: str, action: Any) -> str:
    """The action's name in a grid world ("RIGHT"), else the number, or a vector's numbers
    (`obs_text`)."""
    if not isinstance(action, int):
        return obs_text(action)
    names = ACTIONS.get(family_of(env_id) or "", ())
    return names[action] if 0 <= action < len(names) else str(action)


def obs_text(obs: Any) -> str:
    """An observation as the viewers print it: an integer as it is, a vector's numbers to four
    significant digits ("[0.0246, 0.173, -0.000519, -0.245]"), "not stored" for None (pixels
    left out, by default)."""
    if obs is None:
        return "not stored"
    if isinstance(obs, list | tuple):
        return "[" + ", ".join(obs_text(x) for x in obs) + "]"
    return f"{obs:.4g}" if isinstance(obs, float) else str(obs)


@dataclass(frozen=True)
class GridWorld:
    """The fixed layout of one environment; `scene(obs)` places the agent."""

    family: str
    board: tuple[str, ...]
    walls: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @classmethod
    def for_env(cls, env_id: str, env_kwargs: dict[str, Any] | None = None) -> GridWorld | None:
        """The layout of `env_id` made with `env_kwargs`; None when it is not a grid world."""
        family = family_of(env_id)
        if family is None:
            return None
        kwargs = {**_registered_kwargs(env_id), **(env_kwargs or {})}
        if family == "FrozenLake":
            return cls(family, frozen_lake_board(kwargs.get("desc"), kwargs.get("map_name")))
        if family == "CliffWalking":
            rows, cols = CLIFF_SHAPE
            return cls(family, ("." * cols,) * (rows - 1) + ("S" + "C" * (cols - 2) + "G",))
        board = tuple("".join(line[1 + 2 * c] for c in range(5)).replace(" ", ".")
                      for line in TAXI_MAP[1:-1])
        board = tuple(row.replace("G", "g") for row in board)  # a stand, not a goal
        walls = frozenset((r, c) for r, line in enumerate(TAXI_MAP[1:-1])
                          for c in range(4) if line[2 + 2 * c] == "|")
        return cls(family, board, walls)

    @property
    def cells(self) -> int:
        return len(self.board) * len(self.board[0])

    def scene(self, obs: int) -> Scene:
        """The board with the agent for observation `obs`; ValueError when it is out of range."""
        obs = int(obs)
        if self.family == "Taxi":
            taxi_row, taxi_col, pass_loc, dest = decode_taxi(obs)
            carrying = pass_loc == 4
            return Scene(self.family, self.board, (taxi_row, taxi_col), self.walls,
                         None if carrying else TAXI_STANDS[pass_loc], TAXI_STANDS[dest], carrying)
        cols = len(self.board[0])
        if not 0 <= obs < self.cells:
            raise ValueError(f"observation {obs} is outside this {len(self.board)}x{cols} board")
        return Scene(self.family, self.board, divmod(obs, cols), self.walls)


def decode_taxi(obs: int) -> tuple[int, int, int, int]:
    """Taxi's state number as (taxi row, taxi col, passenger location 0-4, destination 0-3).

    The encoding is ((row * 5 + col) * 5 + passenger) * 4 + destination; passenger 4 means in
    the taxi, 0-3 the stands R, G, Y, B.
    """
    if not 0 <= obs < 500:
        raise ValueError(f"observation {obs} is not a Taxi state (0-499)")
    obs, dest = divmod(obs, 4)
    obs, passenger = divmod(obs, 5)
    row, col = divmod(obs, 5)
    return row, col, passenger, dest


def frozen_lake_board(desc: Any, map_name: Any) -> tuple[str, ...]:
    """A FrozenLake map as rows of S F H G: `desc` (rows of letters) wins over `map_name`."""
    if desc is not None:
        rows = tuple("".join(_letter(ch) for ch in row) for row in desc)
        if not rows or any(len(r) != len(rows[0]) or set(r) - set("SFHG") for r in rows):
            raise ValueError(f"not a FrozenLake map: {desc!r}")
        return rows
    from gymnasium.envs.toy_text.frozen_lake import MAPS

    name = str(map_name or "4x4")
    if name not in MAPS:
        raise ValueError(f"unknown FrozenLake map {name!r} (known: {', '.join(MAPS)})")
    return tuple(MAPS[name])


def _letter(ch: Any) -> str:
    return ch.decode() if isinstance(ch, bytes) else str(ch)


def _registered_kwargs(env_id: str) -> dict[str, Any]:
    try:
        import gymnasium as gym

        return dict(gym.spec(env_id).kwargs)
    except Exception:  # noqa: BLE001 - an id this Gymnasium lacks: the family's defaults
        return {}


# --- text -----------------------------------------------------------------------------------------


def _cells(scene: Scene) -> list[list[tuple[str, str]]]:
    """(three characters, style) per cell; the agent's cell in brackets."""
    rows = []
    for r, line in enumerate(scene.board):
        row = []
        for c, letter in enumerate(line):
            shown = "G" if letter == "g" else letter
            style = STYLES.get(KINDS.get(letter, "path"), "")
            if (r, c) == scene.passenger:
                shown, style = shown.lower() if shown != "." else "p", "bold blue"
            if (r, c) == scene.destination:
                style = "bold magenta"
            if (r, c) == scene.agent:
                agent_style = "bold black on green" if scene.carrying else "bold black on yellow"
                row.append((f"[{shown}]", agent_style if scene.family == "Taxi" else "bold reverse"))
            else:
                row.append((f" {shown} ", style))
        rows.append(row)
    return rows


def to_rich(scene: Scene) -> Text:
    """The board as styled text (walls `|` between Taxi cells), with its caption below."""
    text = Text()
    border = "+" + "-" * (4 * scene.cols - 1) + "+" if scene.walls else ""
    if border:
        text.append(border + "\n")
    for r, row in enumerate(_cells(scene)):
        if scene.walls:
            text.append("|")
        for c, (chars, style) in enumerate(row):
            text.append(chars, style=style)
            if c < scene.cols - 1:
                text.append("|" if (r, c) in scene.walls else " ")
        text.append("|\n" if scene.walls else "\n")
    if border:
        text.append(border + "\n")
    text.append(scene.caption(), style="italic")
    return text


def to_text(scene: Scene) -> str:
    """The board as plain text: the agent's cell in brackets, e.g. `[H]`."""
    return to_rich(scene).plain
