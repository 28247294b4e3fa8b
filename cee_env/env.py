"""Early exiting as a Gymnasium environment: one instance per episode, one layer per step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from cee_env.cache import LayerCache
from cee_env.hardness import memorized_layer
from cee_env.observations import OBS_MODES, bounds, observe
from cee_env.rewards import REWARDS, exit_quality, exit_reward

CONTINUE, EXIT = 0, 1
INFO_KEYS = ("layer", "prediction", "label", "correct", "memorized_layer", "log_p_true", "index")


def resolve_cache(
    cache: LayerCache | None,
    task: str | None,
    split: str | None,
    checkpoint: str | None,
    data_dir: str | None,
    test_file: str | None,
    cache_kwargs: dict[str, Any] | None,
    model: str | None = None,
) -> LayerCache:
    """The cache to serve: ``cache`` itself, the synthetic one (task "Synthetic") or ``get_cache(task, ...)``."""
    if (cache is None) == (task is None):
        raise ValueError("pass exactly one of cache=LayerCache(...) or task='RTE' (or another task name)")
    if cache is not None:
        if not isinstance(cache, LayerCache):
            raise TypeError(f"cache must be a cee_env.cache.LayerCache; got {type(cache).__name__}")
        return cache
    if task.lower() == "synthetic":
        from cee_env.synthetic import make_synthetic_cache

        return make_synthetic_cache(split=split or "train", **(cache_kwargs or {}))
    from cee_env.cache import get_cache  # written elsewhere; imported lazily

    out = get_cache(
        task=task, split=split or "train", checkpoint=checkpoint, data_dir=data_dir,
        test_file=test_file, **({"model": model} if model else {}), **(cache_kwargs or {}),
    )
    if not isinstance(out, LayerCache):
        raise TypeError(f"get_cache returned {type(out).__name__}, expected LayerCache")
    return out


def check_env_args(reward: str, alpha: float, obs: str, obs_bound: float = 50.0, flag: str = "") -> None:
    """The environment's arguments, checked (a ``ValueError`` naming the argument): one check for ``gym.make``
    and for the commands' flags (``flag="--"`` names them as flags)."""
    if reward not in REWARDS:
        raise ValueError(f"{flag}reward must be one of {', '.join(REWARDS)}; got {reward!r}")
    if not (_finite(alpha) and alpha >= 0):
        raise ValueError(f"{flag}alpha must be a finite number >= 0 (the depth penalty per layer); got {alpha!r}")
    if obs not in OBS_MODES:
        raise ValueError(f"{flag}obs must be one of {', '.join(OBS_MODES)}; got {obs!r}")
    if not (_finite(obs_bound) and obs_bound > 0):
        raise ValueError(f"{flag}obs_bound must be a finite number > 0; got {obs_bound!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and bool(np.isfinite(x))


@dataclass
class EpisodeTables:
    """Everything ``step`` needs, precomputed per instance and layer (shared by the single and vector env).

    ``obs`` float32 [N, L, D] (read-only; a zero-copy view of ``cache.states`` when
    obs="state" and the states are float32, C-contiguous and already inside the bound),
    ``reward`` float64 [N, L] (reward if the instance exits at layer l+1), ``preds``,
    ``correct``, ``log_p_true`` [N, L], ``labels``, ``memorized`` [N].
    """

    obs: np.ndarray
    reward: np.ndarray
    preds: np.ndarray
    correct: np.ndarray
    log_p_true: np.ndarray
    labels: np.ndarray
    memorized: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def build(
        cls, cache: LayerCache, reward: str, alpha: float, obs: str, obs_bound: float,
        memorized: np.ndarray | None,
    ) -> "EpisodeTables":
        check_env_args(reward, alpha, obs, obs_bound)
        n, L, H = cache.states.shape
        if n == 0:
            raise ValueError("the cache holds no instances")
        labels = np.asarray(cache.labels, dtype=np.int64)
        preds = cache.preds.astype(np.int64)
        if memorized is None:
            memorized = memorized_layer(preds, labels)
        memorized = np.asarray(memorized, dtype=np.int64)
        if memorized.shape != (n,) or memorized.min() < 1 or memorized.max() > L:
            raise ValueError(f"memorized must be int [{n}] with values in 1..{L}; got shape {memorized.shape}")
        # log p_t(y|x); unlabeled instances (label -1) get 0, so their reward is the depth term only.
        lp = np.take_along_axis(cache.log_probs, np.maximum(labels, 0)[:, None, None], axis=2)[..., 0]
        lp = np.where(labels[:, None] >= 0, lp, 0.0).astype(np.float64)
        t = np.arange(1, L + 1)[None, :]
        rew = exit_reward(exit_quality(reward, lp, preds, labels), t, alpha, reward, memorized[:, None], L)
        if not np.isfinite(rew).all():
            bad = np.argwhere(~np.isfinite(rew))[0]
            raise ValueError(f"{cache.task}/{cache.split}: the {reward} reward is not finite for instance {bad[0]} at "
                             f"layer {bad[1] + 1} (log p = {lp[bad[0], bad[1]]}; alpha = {alpha}); the cache or the "
                             "arguments are damaged: rebuild the cache (delete its folder under runs/cache) or fix --alpha")

        B = np.float32(obs_bound)
        states = cache.states
        if obs == "state" and states.dtype == np.float32 and states.flags.c_contiguous and (
            float(states.min()) >= -B and float(states.max()) <= B
        ):
            table = states.view()
        else:
            table = observe(states, cache.log_probs, obs, L, obs_bound)
        table.flags.writeable = False
        low, high = bounds(obs, H, L, cache.num_classes, obs_bound)
        return cls(table, rew, preds, preds == labels[:, None], lp, labels, memorized, low, high)


class EarlyExitEnv(gym.Env[np.ndarray, int]):
    """
    ## Description

    Early exiting (ConsistentEE, AAAI 2024) as a sequential decision problem. A frozen
    multi-exit backbone has been run once over a split and its per-layer outputs
    cached (:class:`~cee_env.cache.LayerCache`). One episode is one instance: the
    agent sees the state after layer 1, 2, ... and at each layer decides to Continue
    or to Exit; on Exit the instance is answered by that layer's internal classifier.
    No transformer runs inside ``step``.

    ## Action Space

    ``Discrete(2)``: 0 = Continue to the next layer, 1 = Exit here. Continue at the
    last layer L exits there.

    ## Observation Space

    ``Box(float32, (D,))`` for the current layer l, with finite bounds B = ``obs_bound``:

    | obs             | D     | content                                                    |
    |-----------------|-------|------------------------------------------------------------|
    | ``state``       | H     | s_l clipped to [-B, B]                                     |
    | ``state_layer`` | H + L | s_l, then a one-hot of l in [0, 1]                         |
    | ``state_probs`` | H + C | s_l, then p_l(. given x), the layer's class probabilities |
    | ``confidence``  | 6+L+C | max prob, 2nd prob, entropy/log C, agreement with layer l-1, |
    |                 |       | patience/(L-1), previous max prob; one-hot of l; p_l         |
    | ``state_confidence`` | H+6+L+C | s_l, then everything ``confidence`` has           |

    (:mod:`cee_env.observations` computes them; an early-exit model gets the same numbers.)

    Every call returns a fresh float32 array (a copy of a row of a precomputed table).

    ## Rewards

    0 for Continue; at the exit layer t (1-based) a terminal reward (see
    :mod:`cee_env.rewards`), with log p_t(y|x) from the cache and m the memorized layer:

    - ``hardness`` (default, Eq 4): log p_t(y|x) - alpha * t * (1 - m/L)
    - ``vanilla`` (Eq 3): log p_t(y|x) - alpha * t
    - ``hardness_weighted``: (m/L) log p_t(y|x) - (1 - m/L) alpha t

    m defaults to Eq 7 computed from this cache's own predictions and labels. Hardness is
    defined on the training set; for dev/test caches the default is still computed from the
    cache's labels (useful for analysis) - pass ``memorized=`` to override. Unlabeled
    instances (label -1) have log p = 0, correct = False and m = L.

    ## Starting State

    ``reset`` picks an instance and reveals s_1. Split "train": uniformly at random with
    the env's ``np_random`` (seeded by ``reset(seed=...)`` or the ``seed`` argument).
    Any other split, or ``sequential=True``: instances 0, 1, ..., N-1 in order, wrapping,
    so N episodes are one evaluation pass; ``reset(seed=...)`` restarts the pass at 0.
    ``reset(options={"index": i})`` serves instance i (sequential order continues at i+1).

    ## Episode End

    Terminated on Exit or on Continue at layer L; never truncated (at most L steps).

    ``info`` at reset and every step describes the current layer (the exit layer at the
    end): ``layer`` (1-based), ``prediction``, ``label``, ``correct``, ``memorized_layer``,
    ``log_p_true``, ``index`` (instance index in the cache).

    ## Arguments

    ``EarlyExitEnv(cache=LayerCache(...))`` or ``EarlyExitEnv(task="RTE", split="train",
    checkpoint=None, data_dir=None, test_file=None)`` (loads ``cee_env.cache.get_cache``;
    task "Synthetic" builds :func:`~cee_env.synthetic.make_synthetic_cache`;
    ``cache_kwargs`` go to either). Then ``reward`` in :data:`~cee_env.rewards.REWARDS`,
    ``alpha`` (depth penalty per layer, default 0.05), ``obs`` in :data:`OBS_MODES`,
    ``obs_bound`` (B, default 50), ``memorized`` (int [N] in 1..L), ``sequential``
    (None = split != "train"), ``seed``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
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
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"EarlyExitEnv has no render modes; got render_mode={render_mode!r}")
        self.cache = resolve_cache(cache, task, split, checkpoint, data_dir, test_file, cache_kwargs, model)
        self.split = split or self.cache.split or "train"
        self.sequential = (self.split not in ("train", "calib")) if sequential is None else bool(sequential)
        self.reward_kind, self.alpha, self.obs_mode = reward, float(alpha), obs
        self.tables = t = EpisodeTables.build(self.cache, reward, self.alpha, obs, obs_bound, memorized)
        self.num_instances, self.num_layers = t.obs.shape[:2]
        self.memorized = t.memorized
        self.observation_space = spaces.Box(t.low, t.high, dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        # Python lists: indexing them is several times faster than numpy scalar indexing.
        self._rew, self._pred = t.reward.tolist(), t.preds.tolist()
        self._lp, self._lab, self._mem = t.log_p_true.tolist(), t.labels.tolist(), t.memorized.tolist()
        self._last = self.num_layers - 1
        self._next = 0  # sequential pointer
        self._draws: list[int] = []  # pre-drawn training indices (consumed from the end)
        self._done = True
        self._i = self._l = 0
        if seed is not None:
            super().reset(seed=seed)

    def _info(self, i: int, l: int) -> dict[str, Any]:
        p, y = self._pred_i[l], self._y
        return {"layer": l + 1, "prediction": p, "label": y, "correct": p == y,
                "memorized_layer": self._m, "log_p_true": self._lp_i[l], "index": i}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._next, self._draws = 0, []
        if options and options.get("index") is not None:
            i = int(options["index"])
            if not 0 <= i < self.num_instances:
                raise IndexError(f"options['index']={i} outside 0..{self.num_instances - 1}")
            self._next = (i + 1) % self.num_instances
        elif self.sequential:
            i = self._next
            self._next = (i + 1) % self.num_instances
        else:
            if not self._draws:
                self._draws = self.np_random.integers(self.num_instances, size=1024).tolist()[::-1]
            i = self._draws.pop()
        self._i, self._l, self._done = i, 0, False
        self._obs_i, self._rew_i, self._pred_i, self._lp_i = self.tables.obs[i], self._rew[i], self._pred[i], self._lp[i]
        self._y, self._m = self._lab[i], self._mem[i]
        return self._obs_i[0].copy(), self._info(i, 0)

    def step(self, action: int) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("the episode has ended (or never started): call reset() before step()")
        l = self._l
        if action == CONTINUE and l < self._last:
            self._l = l = l + 1
            return self._obs_i[l].copy(), 0.0, False, False, self._info(self._i, l)
        if action != CONTINUE and action != EXIT:
            raise ValueError(f"invalid action {action!r}; expected 0 (Continue) or 1 (Exit)")
        self._done = True
        return self._obs_i[l].copy(), self._rew_i[l], True, False, self._info(self._i, l)
