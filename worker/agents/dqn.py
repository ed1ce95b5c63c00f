"""A deep Q-network in CleanRL's single-file shape, for discrete actions and vector observations.

An MLP Q-network, a numpy ring-buffer of transitions, a target network copied (or blended by
`tau`) every `target_network_frequency` steps, and epsilon falling linearly over a fraction of
`total_steps`. Everything runs on the run process's main thread, on CUDA when a GPU is visible
and on one CPU thread otherwise; with the same seed, a CPU run repeats itself exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from gymbus.shared.policy_files import POLICY_FILES
from gymbus.shared.runconfig import DqnParams
from gymbus.worker.agents.base import Agent, Artifact, Budget, MetricSink

EXPLORE = "explore"
EXPLOIT = "exploit"
GREEDY = "greedy"
#: environment steps between two `losses/*` metrics
LOG_EVERY = 100
#: the version of the q_network.json layout
NETWORK_FORMAT = "gymbus.dqn.v1"


def pick_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU (one thread: runs share the machine)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(1)
    return torch.device("cpu")


def make_deterministic(seed: int) -> None:
    """Seed torch and ask for deterministic kernels (the CUBLAS setting is needed on CUDA).

    `warn_only`: a CUDA kernel without a deterministic version warns instead of failing the run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True


class QNetwork(nn.Module):
    """An MLP from an observation vector to one Q-value per action (ReLU between layers)."""

    def __init__(self, obs_size: int, n_actions: int, hidden_sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, n_actions))
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(x)
        return out


class ReplayBuffer:
    """The last `capacity` transitions in preallocated numpy arrays, sampled uniformly."""

    def __init__(self, capacity: int, obs_size: int) -> None:
        self.obs = np.zeros((capacity, obs_size), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_size), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.capacity = capacity
        self.size = 0
        self._next = 0

    def add(self, obs: Any, next_obs: Any, action: int, reward: float, terminated: bool) -> None:
        """Store one transition; `terminated` (not a time limit) stops the bootstrap."""
        i = self._next
        self.obs[i] = obs
        self.next_obs[i] = next_obs
        self.actions[i] = action
        self.rewards[i] = reward
        self.dones[i] = terminated
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, size=n)
        return (self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx],
                self.dones[idx])


class DqnAgent:
    """DQN on a Box observation (a vector) and a Discrete action space.

    `act` is epsilon-greedy with epsilon after `global_step` steps; `learn` stores the
    transition and, past `learning_starts`, trains every `train_frequency` steps. Publishes
    `losses/td_loss` and `losses/q_values` every LOG_EVERY steps and `charts/epsilon` per episode.
    """

    has_labels = True
    learns = True
    draw: Callable[[], Any] | None = None

    def __init__(
        self,
        params: DqnParams,
        observation_space: spaces.Space[Any],
        action_space: spaces.Space[Any],
        budget: Budget,
        rng: np.random.Generator,
        sink: MetricSink,
        seed: int,
        device: torch.device | None = None,
    ) -> None:
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise ValueError(f"dqn needs a vector (1-D Box) observation space, got {observation_space}")
        if not isinstance(action_space, spaces.Discrete) or action_space.start != 0:
            raise ValueError(f"dqn needs a Discrete action space starting at 0, got {action_space}")
        make_deterministic(seed)
        self.params = params
        self.device = device or pick_device()
        self.obs_size = int(observation_space.shape[0])
        self.n_actions = int(action_space.n)
        self.hidden_sizes = tuple(params.hidden_sizes)
        self.q_network = self._network()
        self.target_network = self._network()
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.optimizer = torch.optim.Adam(self.q_network.parameters(), lr=params.learning_rate)
        self.buffer = ReplayBuffer(params.buffer_size, self.obs_size)
        self._rng = rng
        self._sink = sink
        horizon = budget.total_steps or 0
        self._decay_steps = max(params.exploration_fraction * horizon, 1.0)
        self.global_step = 0
        self.epsilon = params.epsilon_start
        self.label: str | None = None
        self._next_log = params.learning_starts + LOG_EVERY

    def _network(self) -> QNetwork:
        return QNetwork(self.obs_size, self.n_actions, self.hidden_sizes).to(self.device)

    def epsilon_at(self, step: int) -> float:
        """CleanRL's linear schedule: start -> end over exploration_fraction * total_steps."""
        p = self.params
        slope = (p.epsilon_end - p.epsilon_start) / self._decay_steps
        return max(slope * step + p.epsilon_start, p.epsilon_end)

    def begin_episode(self, episode: int, global_step: int) -> None:
        return None

    def act(self, obs: Any) -> int:
        self.epsilon = self.epsilon_at(self.global_step)
        if self._rng.random() < self.epsilon:
            self.label = EXPLORE
            return int(self._rng.integers(self.n_actions))
        self.label = EXPLOIT
        return greedy_action(self.q_network, obs, self.device)

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        self.buffer.add(obs, next_obs, action, reward, terminated)
        self.global_step += 1
        p = self.params
        step = self.global_step
        if step <= p.learning_starts:
            return
        if step % p.train_frequency == 0:
            for _ in range(p.gradient_steps):
                loss, q_values = self._train_step()
            if step >= self._next_log:
                self._next_log = step + LOG_EVERY
                self._sink.metric("losses/td_loss", step, loss)
                self._sink.metric("losses/q_values", step, q_values)
        if step % p.target_network_frequency == 0:
            self._update_target()

    def _train_step(self) -> tuple[float, float]:
        """One gradient step on a sampled batch; returns the TD loss and the mean Q of the batch."""
        p = self.params
        obs, actions, rewards, next_obs, dones = (
            torch.from_numpy(a).to(self.device) for a in self.buffer.sample(p.batch_size, self._rng)
        )
        with torch.no_grad():
            target_max = self.target_network(next_obs).max(dim=1).values
            td_target = rewards + p.gamma * target_max * (1.0 - dones)
        old_val = self.q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.mse_loss(td_target, old_val)
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return float(loss.item()), float(old_val.mean().item())

    def _update_target(self) -> None:
        tau = self.params.tau
        with torch.no_grad():
            for target, online in zip(self.target_network.parameters(),
                                      self.q_network.parameters()):
                target.copy_(tau * online + (1.0 - tau) * target)

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        self._sink.metric("charts/epsilon", global_step, self.epsilon)

    def network_meta(self) -> dict[str, Any]:
        """What q_network.json holds: enough to rebuild the network before loading its weights."""
        return {"format": NETWORK_FORMAT, "obs_size": self.obs_size, "n_actions": self.n_actions,
                "hidden_sizes": list(self.hidden_sizes), "activation": "relu",
                "torch": torch.__version__}

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load saved weights into both networks."""
        self.q_network.load_state_dict(state_dict)
        self.target_network.load_state_dict(state_dict)

    def artifacts(self) -> list[Artifact]:
        """`q_network.json` (the shape), then `q_network.pt` (the state_dict, on the CPU)."""
        weights = {k: v.detach().cpu() for k, v in self.q_network.state_dict().items()}
        pt = POLICY_FILES["dqn"]
        return [Artifact("q_network_meta", pt.replace(".pt", ".json"), "json", self.network_meta()),
                Artifact("q_network", pt, "torch", weights)]

    def evaluator(self) -> Agent:
        return GreedyDqn(self.q_network, self.device, self._sink)


def greedy_action(network: nn.Module, obs: Any, device: torch.device) -> int:
    """argmax of the network's Q-values for one observation (lowest index among ties)."""
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
        return int(network(x.unsqueeze(0)).argmax(dim=1).item())


class GreedyDqn:
    """The greedy policy of a Q-network (shared with its learner); learns nothing."""

    has_labels = True
    learns = False
    draw: Callable[[], Any] | None = None
    label: str | None = GREEDY

    def __init__(self, network: nn.Module, device: torch.device, sink: MetricSink) -> None:
        self.network = network
        self.device = device
        self._sink = sink

    def begin_episode(self, episode: int, global_step: int) -> None:
        return None

    def act(self, obs: Any) -> int:
        return greedy_action(self.network, obs, self.device)

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        return None

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        self._sink.metric("charts/epsilon", global_step, 0.0)

    def artifacts(self) -> list[Artifact]:
        return []

    def evaluator(self) -> Agent:
        return self
