"""N early-exit episodes stepped at once with numpy (no Python loop over sub-environments)."""
from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from cee_env.cache import LayerCache
from cee_env.env import EXIT, EpisodeTables, resolve_cache


class EarlyExitVectorEnv(VectorEnv):
    """``num_envs`` copies of :class:`~cee_env.env.EarlyExitEnv` sharing one cache, stepped with array ops.

    Same arguments and semantics as the single env, plus ``num_envs`` and ``copy`` (return
    fresh observation arrays; with ``copy=False`` the same buffer is overwritten every
    call, like ``SyncVectorEnv(copy=False)``).

    Autoreset is Gymnasium's default ``AutoresetMode.NEXT_STEP``: the step that ends an
    episode returns its terminal observation, reward and ``terminated=True``; the *next*
    ``step`` ignores that sub-env's action, resets it and returns the new instance's first
    observation with reward 0, ``terminated=False`` and its reset info.

    Instance choice: split "train" draws uniformly from the vector env's ``np_random``
    (one draw per resetting sub-env, in sub-env order); otherwise (or ``sequential=True``)
    one shared pointer hands out 0, 1, ..., N-1 (wrapping): ``reset()`` gives sub-env k
    the k-th next instance, and autoresets take the next ones in sub-env order.
    ``reset(seed=s)`` reseeds and restarts the pointer; ``reset(options={"indices": ids})``
    serves explicit instances; ``options={"reset_mask": mask}`` resets only some sub-envs.

    ``infos`` is a dict of arrays with the single env's keys (``layer``, ``prediction``,
    ``label``, ``correct``, ``memorized_layer``, ``log_p_true``, ``index``), each with its
    Gymnasium ``_key`` mask (all True: every sub-env reports every key every step).
    """

    metadata: dict[str, Any] = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        cache: LayerCache | None = None,
        *,
        task: str | None = None,
        split: str | None = None,
        checkpoint: str | None = None,
        model: str | None = None,
        data_dir: str | None = None,
        test_file: str | None = None,
        cache_kwargs: dict[str, Any] | None = None,
        reward: str = "hardness",
        alpha: float = 0.05,
        obs: str = "state",
        obs_bound: float = 50.0,
        memorized: np.ndarray | None = None,
        sequential: bool | None = None,
        seed: int | None = None,
        copy: bool = True,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"EarlyExitVectorEnv has no render modes; got render_mode={render_mode!r}")
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1; got {num_envs}")
        self.num_envs = n = int(num_envs)
        self.cache = resolve_cache(cache, task, split, checkpoint, data_dir, test_file, cache_kwargs, model)
        self.split = split or self.cache.split or "train"
        self.sequential = (self.split not in ("train", "calib")) if sequential is None else bool(sequential)
        self.reward_kind, self.alpha, self.obs_mode, self.copy = reward, float(alpha), obs, bool(copy)
        self.tables = t = EpisodeTables.build(self.cache, reward, self.alpha, obs, obs_bound, memorized)
        self.num_instances, self.num_layers, dim = t.obs.shape
        self.memorized = t.memorized
        self.metadata = dict(self.metadata)
        self.single_observation_space = spaces.Box(t.low, t.high, dtype=np.float32)
        self.single_action_space = spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)
        # Flat [N*L] tables indexed by flat = index * L + (layer - 1).
        L = self.num_layers
        self._obs_flat = t.obs.reshape(-1, dim)
        self._rew_flat, self._pred_flat = t.reward.reshape(-1), t.preds.reshape(-1)
        self._cor_flat, self._lp_flat = t.correct.reshape(-1), t.log_p_true.reshape(-1)
        self._idx = np.zeros(n, dtype=np.int64)
        self._layer = np.zeros(n, dtype=np.int64)  # 0-based
        self._flat = np.zeros(n, dtype=np.int64)
        self._autoreset = np.zeros(n, dtype=bool)
        self._buf = None if self.copy else np.empty((n, dim), dtype=np.float32)  # reused when copy=False
        self._trunc = np.zeros(n, dtype=bool)
        self._last = L - 1
        self._next = 0
        self._started = False
        if seed is not None:
            super().reset(seed=seed)

    def _draw(self, k: int) -> np.ndarray:
        if not self.sequential:
            return self.np_random.integers(self.num_instances, size=k)
        ids = (self._next + np.arange(k)) % self.num_instances
        self._next = int((self._next + k) % self.num_instances)
        return ids

    def _observe(self) -> tuple[np.ndarray, dict[str, Any]]:
        idx, flat, m = self._idx, self._flat, np.ones(self.num_envs, dtype=bool)
        np.multiply(idx, self.num_layers, out=flat)
        flat += self._layer
        obs = np.take(self._obs_flat, flat, axis=0, out=None if self.copy else self._buf, mode="clip")
        infos = {
            "layer": self._layer + 1, "_layer": m,
            "prediction": self._pred_flat[flat], "_prediction": m,
            "label": self.tables.labels[idx], "_label": m,
            "correct": self._cor_flat[flat], "_correct": m,
            "memorized_layer": self.tables.memorized[idx], "_memorized_layer": m,
            "log_p_true": self._lp_flat[flat], "_log_p_true": m,
            "index": idx.copy(), "_index": m,
        }
        return obs, infos

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"EarlyExitVectorEnv.reset takes one int seed (one shared RNG); got {seed!r}")
        super().reset(seed=seed)
        if seed is not None:
            self._next = 0
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is not None and np.asarray(mask).shape != (self.num_envs,):
            raise ValueError(f"options['reset_mask'] must be bool [{self.num_envs}]")
        sel = np.arange(self.num_envs) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
        ids = options.pop("indices", None)
        if ids is None:
            ids = self._draw(len(sel))
        else:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if ids.shape != (len(sel),) or ids.min() < 0 or ids.max() >= self.num_instances:
                raise ValueError(
                    f"options['indices'] must hold {len(sel)} instance ids in 0..{self.num_instances - 1}"
                )
            if self.sequential:
                self._next = int((ids[-1] + 1) % self.num_instances)
        self._idx[sel] = ids
        self._layer[sel] = 0
        self._autoreset[sel] = False
        self._started = True
        return self._observe()

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},); got {a.shape}")
        if a.dtype.kind not in "iub" or (self.num_envs and (a.min() < 0 or a.max() > 1)):
            raise ValueError("actions must be integers in {0 (Continue), 1 (Exit)}")
        auto = self._autoreset
        term = (a == EXIT) | (self._layer == self._last)
        term &= ~auto
        rewards = np.where(term, self._rew_flat[self._flat], 0.0)
        self._layer += ~(term | auto)
        if auto.any():
            k = np.flatnonzero(auto)
            self._idx[k] = self._draw(len(k))
            self._layer[k] = 0
        self._autoreset = term.copy()
        obs, infos = self._observe()
        return obs, rewards, term, self._trunc.copy(), infos

