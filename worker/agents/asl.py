"""AgentSpeak plan files: found, parsed, checked and built with the `agentspeak` interpreter.

Everything that can be wrong with a plan file is found here, before the run's first step: a
syntax error, an action (a `.name` term) the agent does not provide, a goal the agent posts
without a plan that always applies. Each becomes a PlanError whose message names the file,
line and column, so that the run fails at its start with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agentspeak
import agentspeak.lexer
import agentspeak.parser
import agentspeak.runtime
import agentspeak.stdlib

from gymbus.shared.errors import GymbusError

#: the folder of the plan files shipped with gymbus
SHIPPED_PLANS = Path(__file__).parent / "plans"
DEFAULT_PLANS = "grid.asl"
#: errors reported per plan file before giving up (and interpreter messages kept)
MAX_ERRORS = 10


class PlanError(GymbusError):
    """A plan file cannot be used (syntax, unknown action, missing plan, a plan that failed):
    fix the place it names, or use the shipped plans (`agent.plans` left empty)."""


def plan_path(name: str) -> Path:
    """The plan file of `agent.plans`: empty for the default, a shipped file's name, or a path."""
    if not name:
        name = DEFAULT_PLANS
    path = Path(name) if Path(name).is_absolute() else SHIPPED_PLANS / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in SHIPPED_PLANS.glob("*.asl")))
        where = str(path) if Path(name).is_absolute() else f"{name!r} is not shipped (shipped: {shipped})"
        raise PlanError(f"agent.plans: no such plan file: {where}")
    return path


class _Capture(logging.Handler):
    """Keeps the interpreter's error and warning messages, each with its source location."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        loc = getattr(record, "loc", None)
        where = f"{loc.filename}:{loc.lineno}:{loc.startcol + 1}: " if loc else ""
        self.messages.append(where + record.getMessage())
        del self.messages[:-MAX_ERRORS]


#: the interpreter's own messages (building agents, running plans), kept for PlanError reasons;
#: they also reach stderr, that is the run's log, through agentspeak's own handler
_RUNTIME = _Capture()
logging.getLogger("agentspeak.runtime").addHandler(_RUNTIME)


@dataclass
class PlanLibrary:
    """A built AgentSpeak agent and the label of the plan each body instruction belongs to."""

    path: Path
    agent: agentspeak.runtime.Agent
    #: id(instruction) -> the label of its plan (`@label`, else its trigger, e.g. "+!decide")
    labels: dict[int, str]
    #: the triggers the file has plans for, e.g. {"+!decide/0", "+!goal_reached/0"}
    triggers: frozenset[str]

    def errors(self) -> str:
        """The interpreter's messages since the last call, joined (for PlanError reasons)."""
        text = "; ".join(_RUNTIME.messages)
        _RUNTIME.messages.clear()
        return text


def load_plans(
    path: Path, actions: agentspeak.Actions, required: Iterable[str] = ()
) -> PlanLibrary:
    """Parse, check and build the plan file; `required` are triggers like "+!decide/0" that
    need a plan without a context (one that always applies)."""
    capture = _Capture()
    log = agentspeak.Log(_logger(capture), MAX_ERRORS)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read the plan file {path}: {exc}") from None
    source = agentspeak.StringSource(path.name, text)
    try:
        ast = agentspeak.parser.parse(path.name, agentspeak.lexer.TokenStream(source, log), log)
        log.throw()
    except (agentspeak.AggregatedError, agentspeak.AslError) as exc:
        detail = "; ".join(capture.messages) or str(exc)
        raise PlanError(f"syntax error in {path}: {detail}") from None
    _check_actions(path, ast, actions)
    triggers = frozenset(plan.event.signature() for plan in ast.plans)
    for trigger in required:
        if not any(p.event.signature() == trigger and p.context is None for p in ast.plans):
            raise PlanError(f"{path}: no plan for {trigger.rsplit('/', 1)[0]} without a context; "
                            "add one that always applies (the agent posts this goal itself)")
    _RUNTIME.messages.clear()
    try:
        _, agent = agentspeak.runtime.Environment().build_agent_from_ast(source, ast, actions)
    except (agentspeak.AggregatedError, agentspeak.AslError) as exc:
        detail = "; ".join(_RUNTIME.messages) or str(exc)
        raise PlanError(f"{path}: {detail}") from None
    return PlanLibrary(path, agent, _plan_labels(agent), triggers)


def _logger(capture: _Capture) -> logging.Logger:
    """A private logger for one parse: its messages go to `capture` only."""
    # not getLogger: a logger per parse must not stay registered for the life of the process
    logger = logging.Logger(f"gymbus.asl.{id(capture)}", logging.WARNING)  # noqa: LOG001
    logger.addHandler(capture)
    return logger


def _check_actions(path: Path, ast: Any, actions: agentspeak.Actions) -> None:
    """Every `.action(...)` term of the file must be one the agent or the stdlib provides."""
    for literal in _literals(ast):
        functor = literal.functor
        if not isinstance(functor, str) or not functor.startswith("."):
            continue
        try:
            actions.lookup(functor, len(literal.terms))
        except KeyError:
            loc = literal.loc
            where = f"{path}:{loc.lineno}:{loc.startcol + 1}" if loc else str(path)
            raise PlanError(f"{where}: unknown action {functor}/{len(literal.terms)} "
                            f"(this agent's actions: {', '.join(_own_actions(actions))}; "
                            "and the agentspeak stdlib's)") from None


def _literals(node: Any) -> Iterator[Any]:
    """Every literal in an AST (plans, rules, beliefs, goals), however deep."""
    if isinstance(node, agentspeak.parser.AstLiteral):
        yield node
    if isinstance(node, list | tuple):
        for item in node:
            yield from _literals(item)
    elif isinstance(node, agentspeak.parser.AstNode):
        for name, value in vars(node).items():
            if name != "loc":
                yield from _literals(value)


def _own_actions(actions: agentspeak.Actions) -> list[str]:
    return sorted(f"{functor}/{arity}" for functor, arity in actions.actions)


def _plan_labels(agent: agentspeak.runtime.Agent) -> dict[int, str]:
    """Map every instruction of every plan body to its plan's label."""
    labels: dict[int, str] = {}
    for plans in agent.plans.values():
        for plan in plans:
            label = str(plan.annotation.functor) if plan.annotation is not None else (
                f"{plan.trigger.value}{plan.goal_type.value}{plan.head.functor}")
            todo = [plan.body]
            while todo:
                instr = todo.pop()
                if instr is None or id(instr) in labels:
                    continue
                labels[id(instr)] = label
                todo += [instr.success, instr.failure]
    return labels


def new_actions() -> agentspeak.Actions:
    """An action table on top of the agentspeak stdlib (`.print`, `.random`, `.member`, ...)."""
    return agentspeak.Actions(agentspeak.stdlib.actions)
