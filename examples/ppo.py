"""PPO on a Gymnasium vector env in one file, in CleanRL's shape, recorded with gymbus.

    python examples/ppo.py --env-id CartPole-v1 --total-timesteps 20000

An actor and a critic (two small MLPs) collect `--num-steps` steps from each of `--num-envs`
environments, estimate advantages with GAE, and take `--update-epochs` passes of minibatch
updates of the clipped surrogate objective. Truncated episodes (a time limit) are bootstrapped
from the critic's value of their final observation; terminated ones are not.

Recording it takes three lines, marked `# gymbus`: the import, the `with gymbus.run(...)` block
around training, and `envs = run.record(envs)`, which stores every step and episode (returns
and lengths too: CleanRL's `charts/episodic_return` comes from them). The `run.log(...)` calls
stand where CleanRL writes to a SummaryWriter, with CleanRL's metric names. With no stack
running, the run records to its spool and `gymbus sync` stores it later.
"""

from __future__ import annotations

import argparse
import random
import time

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import nn
from torch.distributions import Categorical

import gymbus  # gymbus


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exp-name", default="ppo", help="the experiment's name, in the run's name")
    p.add_argument("--env-id", default="CartPole-v1", help="a Gymnasium env, discrete actions")
    p.add_argument("--seed", type=int, default=1, help="seeds Python, NumPy, torch and the envs")
    p.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="deterministic cuDNN kernels")
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True,
                   help="train on the GPU when there is one")
    p.add_argument("--total-timesteps", type=int, default=500_000,
                   help="steps over all envs, rounded down to whole iterations")
    p.add_argument("--learning-rate", type=float, default=2.5e-4, help="Adam's step size")
    p.add_argument("--num-envs", type=int, default=4, help="parallel environments")
    p.add_argument("--num-steps", type=int, default=128, help="steps per env per rollout")
    p.add_argument("--anneal-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="decay the learning rate linearly to 0")
    p.add_argument("--gamma", type=float, default=0.99, help="the discount")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="GAE's lambda")
    p.add_argument("--num-minibatches", type=int, default=4, help="minibatches per epoch")
    p.add_argument("--update-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--norm-adv", action=argparse.BooleanOptionalAction, default=True,
                   help="normalize advantages per minibatch")
    p.add_argument("--clip-coef", type=float, default=0.2, help="the surrogate's clip range")
    p.add_argument("--clip-vloss", action=argparse.BooleanOptionalAction, default=True,
                   help="clip the value loss as the policy's")
    p.add_argument("--ent-coef", type=float, default=0.01, help="the entropy bonus")
    p.add_argument("--vf-coef", type=float, default=0.5, help="the value loss's weight")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient clipping")
    p.add_argument("--target-kl", type=float, default=None,
                   help="stop an update's epochs early past this approximate KL")
    args = p.parse_args()
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    # every iteration takes batch_size steps: the run takes num_iterations * batch_size
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.num_iterations < 1 or args.minibatch_size < 1:
        p.error(f"--total-timesteps {args.total_timesteps} is less than one rollout "
                f"(--num-envs x --num-steps = {args.batch_size}), or --num-minibatches is "
                "larger than a rollout")
    return args


def layer(n_in: int, n_out: int, gain: float = np.sqrt(2)) -> nn.Linear:
    """A linear layer with orthogonal weights and zero biases (PPO trains best from these)."""
    out = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(out.weight, gain)
    nn.init.zeros_(out.bias)
    return out


class Agent(nn.Module):
    def __init__(self, n_obs: int, n_actions: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(layer(n_obs, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                    layer(64, 1, gain=1.0))
        # a small last layer: the first policy is close to uniform
        self.actor = nn.Sequential(layer(n_obs, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                   layer(64, n_actions, gain=0.01))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def act(self, obs: torch.Tensor, action: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sampled action (or the given one), its log-probability, the entropy, the value."""
        dist = Categorical(logits=self.actor(obs))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(obs)


def gae(rewards: torch.Tensor, values: torch.Tensor, ended: torch.Tensor,
        last_value: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Advantages of a rollout; `ended[t]` is 1 where step t ended its episode, so that the
    value of the next observation (a new episode's) is not bootstrapped from."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        alive = 1.0 - ended[t]
        delta = rewards[t] + gamma * next_value * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
    return advantages


def update(args: argparse.Namespace, agent: Agent, optimizer: torch.optim.Optimizer,
           batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """`update_epochs` passes of minibatch PPO updates over one rollout; the last losses."""
    clipfracs: list[float] = []
    stats: dict[str, float] = {}
    for _ in range(args.update_epochs):
        order = torch.randperm(args.batch_size)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb = order[start:start + args.minibatch_size]
            _, logprob, entropy, value = agent.act(batch["obs"][mb], batch["actions"][mb])
            log_ratio = logprob - batch["logprobs"][mb]
            ratio = log_ratio.exp()
            with torch.no_grad():  # the KL estimators of http://joschu.net/blog/kl-approx.html
                old_approx_kl = (-log_ratio).mean().item()
                approx_kl = ((ratio - 1) - log_ratio).mean().item()
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
            adv = batch["advantages"][mb]
            if args.norm_adv:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            clipped = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
            policy_loss = torch.max(-adv * ratio, -adv * clipped).mean()
            returns, old_value = batch["returns"][mb], batch["values"][mb]
            if args.clip_vloss:
                value_clipped = old_value + (value - old_value).clamp(-args.clip_coef,
                                                                      args.clip_coef)
                value_loss = 0.5 * torch.max((value - returns) ** 2,
                                             (value_clipped - returns) ** 2).mean()
            else:
                value_loss = 0.5 * ((value - returns) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = policy_loss - args.ent_coef * entropy_loss + args.vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            stats = {"value_loss": value_loss.item(), "policy_loss": policy_loss.item(),
                     "entropy": entropy_loss.item(), "old_approx_kl": old_approx_kl,
                     "approx_kl": approx_kl}
        if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
            break
    stats["clipfrac"] = float(np.mean(clipfracs))
    return stats


def main() -> None:
    args = parse_args()
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # SAME_STEP: an ended env is reset within its last step, so every step call is a step of
    # every env, and the final observation of a truncated episode is in info["final_obs"]
    envs = SyncVectorEnv([lambda: gym.make(args.env_id)] * args.num_envs,
                         autoreset_mode=AutoresetMode.SAME_STEP)
    if not isinstance(envs.single_action_space, gym.spaces.Discrete) or \
            not isinstance(envs.single_observation_space, gym.spaces.Box):
        raise SystemExit(f"{args.env_id}: this PPO takes Box observations and discrete actions")
    obs_shape = envs.single_observation_space.shape
    agent = Agent(int(np.prod(obs_shape)), int(envs.single_action_space.n)).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    rollout = (args.num_steps, args.num_envs)
    obs = torch.zeros(rollout + obs_shape, device=device)
    actions = torch.zeros(rollout, dtype=torch.long, device=device)
    logprobs, rewards, ended, values = (torch.zeros(rollout, device=device) for _ in range(4))

    with gymbus.run(name=run_name, config=vars(args), backend="cleanrl") as run:  # gymbus
        envs = run.record(envs)  # gymbus
        global_step, start = 0, time.time()
        next_obs = torch.as_tensor(envs.reset(seed=args.seed)[0], dtype=torch.float32,
                                   device=device)
        for iteration in range(1, args.num_iterations + 1):
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            for t in range(args.num_steps):
                global_step += args.num_envs
                obs[t] = next_obs
                with torch.no_grad():
                    action, logprob, _, value = agent.act(next_obs)
                o, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                reward = np.asarray(reward, dtype=np.float32).copy()
                for i in np.flatnonzero(truncated & ~terminated):  # a time limit: bootstrap
                    final = torch.as_tensor(info["final_obs"][i], dtype=torch.float32,
                                            device=device)
                    with torch.no_grad():
                        reward[i] += args.gamma * agent.value(final).item()
                actions[t], logprobs[t], values[t] = action, logprob, value
                rewards[t] = torch.as_tensor(reward, device=device)
                ended[t] = torch.as_tensor(terminated | truncated, device=device)
                next_obs = torch.as_tensor(o, dtype=torch.float32, device=device)

            with torch.no_grad():
                advantages = gae(rewards, values, ended, agent.value(next_obs),
                                 args.gamma, args.gae_lambda)
            returns = advantages + values
            batch = {"obs": obs.reshape((-1,) + obs_shape), "actions": actions.reshape(-1),
                     "logprobs": logprobs.reshape(-1), "advantages": advantages.reshape(-1),
                     "returns": returns.reshape(-1), "values": values.reshape(-1)}
            stats = update(args, agent, optimizer, batch)

            var_y = batch["returns"].var().item()
            if var_y > 0:  # how much of the returns' variance the critic explains
                stats["explained_variance"] = \
                    1 - (batch["returns"] - batch["values"]).var().item() / var_y
            sps = int(global_step / (time.time() - start))
            run.log({"charts/learning_rate": optimizer.param_groups[0]["lr"],
                     **{f"losses/{k}": v for k, v in stats.items()}, "charts/SPS": sps},
                    step=global_step)
            print(f"global_step={global_step} SPS={sps} value_loss={stats['value_loss']:.3f}")
    envs.close()
    later = f", recorded offline: `gymbus sync {run.run_id}` stores it" if run.offline else ""
    print(f"run {run.run_id}: {global_step} steps{later}")


if __name__ == "__main__":
    main()
