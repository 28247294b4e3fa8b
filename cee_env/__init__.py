"""Early exiting as a Gymnasium environment (ConsistentEE, AAAI 2024).

Importing this package registers ``cee/<Task>-v0`` for the paper's tasks (loaded through
``cee_env.cache.get_cache``) and ``cee/Synthetic-v0`` (a synthetic cache with a known right
exit layer, no transformer needed)::

    import gymnasium as gym, cee_env
    env = gym.make("cee/Synthetic-v0")                      # or gym.make("cee_env:cee/RTE-v0")
    envs = gym.make_vec("cee/Synthetic-v0", num_envs=8, vectorization_mode="vector_entry_point")
"""
from __future__ import annotations

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

for _name in (*TASKS, "Synthetic"):
    if f"cee/{_name}-v0" not in gym.registry:
        gym.register(
            id=f"cee/{_name}-v0",
            entry_point="cee_env.env:EarlyExitEnv",
            vector_entry_point="cee_env.vector_env:EarlyExitVectorEnv",
            kwargs={"task": _name},
            max_episode_steps=None,  # episodes end by themselves after at most L steps
        )

__all__ = [
    "EarlyExitEnv", "EarlyExitVectorEnv", "EpisodeTables", "LayerCache", "INFO_KEYS", "OBS_MODES",
    "REWARDS", "TASKS", "exit_reward", "forgetting_events", "make_synthetic_cache",
    "memorized_histogram", "memorized_layer", "oracle_exit", "table1_correlation",
]
