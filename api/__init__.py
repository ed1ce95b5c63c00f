"""gymbus: record any training loop, watch it live, query every step afterwards.

    import gymbus

    with gymbus.run(name="dqn-cartpole", config=vars(args)) as run:
        env = run.record(gym.make("CartPole-v1"))   # or a gymnasium.vector env
        ...
        run.log({"losses/td_loss": loss}, step=global_step)
        run.save("q_network.pt")

docs/python-api.md says it all; `gymbus.integrations.sb3` records Stable-Baselines3.
"""

from gymbus.session import Run, UsageError, run
from gymbus.spaces import MAX_STORED_VALUES, SpaceError

__all__ = ["MAX_STORED_VALUES", "Run", "SpaceError", "UsageError", "run"]
