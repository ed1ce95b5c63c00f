"""The Qt viewer's submit form: the fields of `gymbus submit` (evaluation runs aside), checked
the way `gymbus submit` checks them before anything is sent. A config error names the field as
the form labels it, and the field is highlighted. Everything here runs on the GUI thread.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from PySide6 import QtWidgets

from gymbus.services.cli.runs import parse_assignments
from gymbus.services.controller.validation import check_environment
from gymbus.shared.errors import ConfigError, GymbusError
from gymbus.shared.protocol import TelemetryMode
from gymbus.shared.runconfig import ALGO_PARAMS, parse_config

ENVIRONMENTS = ("FrozenLake-v1", "FrozenLake8x8-v1", "Taxi-v4", "CliffWalking-v1", "CartPole-v1")
#: the step budget the form proposes for an algorithm that needs one (dqn)
DEFAULT_TOTAL_STEPS = 50_000
#: a config field -> the label of the form's field that holds it
LABELS = {
    "env": "environment", "algo": "algorithm", "episodes": "episodes",
    "total_steps": "total steps", "seed": "seed", "telemetry": "telemetry",
    "every": "every (sampled)", "max_episode_steps": "max episode steps",
    "env_kwargs": "env args", "agent": "agent args", "agent_id": "agent id", "name": "name",
}
#: how the label of the field an error names is shown
HIGHLIGHT = "color: #c0392b; font-weight: bold;"


def _count(maximum: int, value: int, none: str = "") -> QtWidgets.QSpinBox:
    """A spin box for a count; with `none`, 0 shows as that text and means "not given"."""
    box = QtWidgets.QSpinBox()
    box.setRange(0 if none else 1, maximum)
    box.setValue(value)
    if none:
        box.setSpecialValueText(none)
    box.setGroupSeparatorShown(True)
    return box


class SubmitDialog(QtWidgets.QDialog):
    """A run config, field by field; `config()` is what it submits."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Submit a run")
        self.env = QtWidgets.QComboBox()
        self.env.setEditable(True)
        self.env.addItems(ENVIRONMENTS)
        self.algo = QtWidgets.QComboBox()
        self.algo.addItems(list(ALGO_PARAMS))
        self.episodes = _count(100_000_000, 500, "none")
        self.total_steps = _count(2**31 - 1, 0, "none")
        self.seed = QtWidgets.QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.telemetry = QtWidgets.QComboBox()
        self.telemetry.addItems([m.value for m in TelemetryMode])
        self.every = _count(1_000_000, 10)
        self.max_episode_steps = _count(100_000_000, 0, "the environment's own")
        self.env_args = QtWidgets.QLineEdit()
        self.env_args.setPlaceholderText("KEY=VALUE ..., e.g. is_slippery=false")
        self.agent_args = QtWidgets.QLineEdit()
        self.agent_args.setPlaceholderText("KEY=VALUE ..., e.g. learning_rate=0.2")
        self.agent_id = QtWidgets.QLineEdit("agent-0")
        self.name = QtWidgets.QLineEdit()
        self.name.setPlaceholderText("a label for people (optional)")
        self.error = QtWidgets.QLabel("")
        self.error.setStyleSheet("color: #c0392b")
        self.error.setWordWrap(True)
        self.setMinimumWidth(460)
        #: the field the last error named (None when the config was accepted)
        self.highlighted: QtWidgets.QWidget | None = None
        self.fields: dict[str, QtWidgets.QWidget] = {
            "env": self.env, "algo": self.algo, "episodes": self.episodes,
            "total_steps": self.total_steps, "seed": self.seed, "telemetry": self.telemetry,
            "every": self.every, "max_episode_steps": self.max_episode_steps,
            "env_kwargs": self.env_args, "agent": self.agent_args, "agent_id": self.agent_id,
            "name": self.name,
        }
        self.labels = {field: QtWidgets.QLabel(LABELS[field]) for field in self.fields}
        form = QtWidgets.QFormLayout(self)
        for field, widget in self.fields.items():
            form.addRow(self.labels[field], widget)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                             | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.check_and_accept)
        buttons.rejected.connect(self.reject)
        form.addRow(self.error)
        form.addRow(buttons)
        self.algo.currentTextChanged.connect(self._algo_changed)
        self.telemetry.currentTextChanged.connect(
            lambda mode: self.every.setEnabled(mode == TelemetryMode.SAMPLED.value))
        self._algo_changed(self.algo.currentText())
        self.every.setEnabled(False)

    def _algo_changed(self, algo: str) -> None:
        """Say which hyperparameters the algorithm takes; propose a step budget for dqn."""
        params = ALGO_PARAMS.get(algo)
        known = [f"{f.name}={f.default!r}" for f in dataclasses.fields(params)] if params else []
        self.agent_args.setToolTip(f"{algo} takes: {', '.join(known)}" if known
                                   else f"{algo} takes no hyperparameters")
        if algo == "dqn" and self.total_steps.value() == 0:
            self.total_steps.setValue(DEFAULT_TOTAL_STEPS)
            self.episodes.setValue(0)

    def config(self) -> dict[str, Any]:
        """The config the form holds; raises ConfigError for env or agent args it cannot read."""
        config: dict[str, Any] = {"env": self.env.currentText().strip(),
                                  "algo": self.algo.currentText()}
        if self.episodes.value() > 0:
            config["episodes"] = self.episodes.value()
        if self.total_steps.value() > 0:
            config["total_steps"] = self.total_steps.value()
        config["seed"] = self.seed.value()
        config["telemetry"] = self.telemetry.currentText()
        if config["telemetry"] == TelemetryMode.SAMPLED.value:
            config["every"] = self.every.value()
        if self.max_episode_steps.value() > 0:
            config["max_episode_steps"] = self.max_episode_steps.value()
        for field, line in (("env_kwargs", self.env_args), ("agent", self.agent_args)):
            values = self._assignments(line.text(), field)
            if values:
                config[field] = values
        config["agent_id"] = self.agent_id.text().strip()
        if self.name.text().strip():
            config["name"] = self.name.text().strip()
        return config

    @staticmethod
    def _assignments(text: str, field: str) -> dict[str, Any]:
        """KEY=VALUE pairs separated by spaces (quoted where a value holds one), values as TOML."""
        try:
            pairs = shlex.split(text)
        except ValueError as exc:
            raise ConfigError(field, f"cannot split {text!r}: {exc}") from None
        return parse_assignments(tuple(pairs), field)

    def check_and_accept(self) -> None:
        """Check the config as `gymbus submit` does (its fields, then the environment); accept
        it, or name the field at fault and highlight it."""
        try:
            check_environment(parse_config(self.config()))
        except ConfigError as exc:
            self.show_error(exc.field, exc.message)
            return
        except GymbusError as exc:
            self.show_error(None, str(exc))
            return
        self.show_error(None, "")
        self.accept()

    def show_error(self, field: str | None, message: str) -> None:
        """Show `message` about the config `field` (None: about none), or clear it ("")."""
        for field_label in self.labels.values():
            field_label.setStyleSheet("")
        self.highlighted = None
        if not message:
            self.error.setText("")
            return
        name, _, key = (field or "").partition(".")
        widget = self.fields.get(name)
        for raw, label in LABELS.items():  # the message in the form's words
            if "_" in raw:
                message = message.replace(raw, label)
        if widget is None:
            self.error.setText(f"{field}: {message}" if field else message)
            self.adjustSize()
            return
        label = f"{LABELS[name]} ({key})" if key else LABELS[name]
        self.error.setText(f"{label}: {message}")
        self.labels[name].setStyleSheet(HIGHLIGHT)
        widget.setFocus()
        self.highlighted = widget
        self.adjustSize()  # room for the message's lines
