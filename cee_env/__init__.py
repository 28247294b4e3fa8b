"""Early exiting as a Gymnasium environment (ConsistentEE, AAAI 2024).

Importing this package registers ``cee/<Task>-v0`` for the paper's tasks (loaded through
``cee_env.cache.get_cache``) and ``cee/Synthetic-v0`` (a synthetic cache with a known right
exit layer, no transformer needed)::

    import gymnasium as gym, cee_env
    env = gym.make("cee/Synthetic-v0")                      # or gym.make("cee_env:cee/RTE-v0")
    envs = gym.make_vec("cee/Synthetic-v0", num_envs=8, vectorization_mode="vector_entry_point")
"""
from __future__ import annotations

import backbones._numerics  # noqa: F401  (reproducible MKL results; before anything imports torch)

import gymnasium as gym

from cee_env.cache import LayerCache
from cee_env.env import INFO_KEYS, OBS_MODES, EarlyExitEnv, EpisodeTables
from cee_env.hardness import (
    forgetting_events,
    memorized_histogram,
    memorized_layer,
    oracle_exit,
    table1_correlation,
)
from cee_env.rewards import REWARDS, exit_reward
from cee_env.synthetic import make_synthetic_cache
from cee_env.vector_env import EarlyExitVectorEnv

TASKS = ("RTE", "MRPC", "SST2", "MCID", "StackOverflow", "QNLI")

def register_task_env(task: str) -> str:
    """Register ``cee/<task>-v0`` for a task (a catalogued one or one added with
    ``backbones.tasks.task_from_file``) if it is not registered yet; returns the id."""
    env_id = f"cee/{task}-v0"
    if env_id not in gym.registry:
        gym.register(
            id=env_id,
            entry_point="cee_env.env:EarlyExitEnv",
            vector_entry_point="cee_env.vector_env:EarlyExitVectorEnv",
            kwargs={"task": task},
            max_episode_steps=None,  # episodes end by themselves after at most L steps
        )
    return env_id


def env_task(env_id: str) -> str:
    """The task behind an env id; ``cee/<Task>-v0`` of a task not registered yet gets registered."""
    if env_id not in gym.registry:
        if not (env_id.startswith("cee/") and env_id.endswith("-v0")):
            gym.spec(env_id)  # raises gymnasium's error naming similar ids
        register_task_env(env_id[4:-3])
    return gym.spec(env_id).kwargs["task"]


for _name in (*TASKS, "Synthetic"):
    register_task_env(_name)

# Token-level early exiting on SmolLM2 (issue 8): the cache is built by cee_env.token_cache (imported lazily).
if "cee/Alpaca-v0" not in gym.registry:
    gym.register(
        id="cee/Alpaca-v0",
        entry_point="cee_env.token_cache:make_env",
        vector_entry_point="cee_env.token_cache:make_vector_env",
        kwargs={"task": "Alpaca"},
        max_episode_steps=None,
    )

__all__ = [
    "register_task_env", "env_task", "EarlyExitEnv", "EarlyExitVectorEnv", "EpisodeTables", "LayerCache", "INFO_KEYS", "OBS_MODES",
    "REWARDS", "TASKS", "exit_reward", "forgetting_events", "make_synthetic_cache",
    "memorized_histogram", "memorized_layer", "oracle_exit", "table1_correlation",
]
