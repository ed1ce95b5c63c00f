"""gymbus: record any training loop, watch it live, query every step afterwards.

    import gymbus

    with gymbus.run(name="dqn-cartpole", config=vars(args)) as run:
        env = run.record(gym.make("CartPole-v1"))   # or a gymnasium.vector env
        ...
        run.log({"losses/td_loss": loss}, step=global_step)
        run.save("q_network.pt")

docs/python-api.md says it all; `gymbus.integrations.sb3` records Stable-Baselines3.
`gymbus.store()`, `gymbus.steps()`, `gymbus.episodes()`, `gymbus.sql()` read what is stored
(docs/data.md); `gymbus.arrays()` gives steps back in their spaces' dtype and shape.
"""

from gymbus.session import Run, UsageError, run
from gymbus.spaces import MAX_STORED_VALUES, SpaceError
from gymbus.store import Reader, arrays, episodes, metrics, runs, sql, steps, store

__all__ = ["MAX_STORED_VALUES", "Reader", "Run", "SpaceError", "UsageError", "arrays",
           "episodes", "metrics", "run", "runs", "sql", "steps", "store"]
