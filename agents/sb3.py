"""Stable-Baselines3 (PPO, A2C, DQN) on the early-exit environment, evaluated like REINFORCE.

    python -m agents.sb3 --algo ppo --env cee/RTE-v0
    python -m agents.sb3 --algo dqn --env cee/MRPC-v0 --alpha 0.02 --total-timesteps 200000

The agent plays :class:`cee_env.EarlyExitEnv` on the training cache with observation
"state_layer" (s_l clipped to the env's bound, then a one-hot of the layer l), the same
reward (Eq 3/4) and alpha as ``agents.reinforce``. ``n_envs`` copies of the env share
the one loaded cache and run in SB3's DummyVecEnv (SB3 cannot consume Gymnasium
vector envs); DummyVecEnv resets an ended episode in the same step. The reward is
terminal (0 at Continue), so the discount defaults to gamma = 1: the return is then
exactly the reward REINFORCE maximises.

Observations are standardised before the network (``--normalize``): "cache" (default)
with fixed per-feature mean/std of the training cache's states (one-hot untouched),
"running" with VecNormalize's running statistics, or "none". The statistics are saved
with the model and applied again by :class:`SB3Exit`.

The trained model becomes an :class:`~agents.policies.ExitPolicy` (:class:`SB3Exit`):
at layer l it builds the env's observation from the cached state, normalises it and
takes the *deterministic* action of ``model.predict`` for every algorithm (argmax of
the action probabilities for PPO/A2C, i.e. exit iff P(exit) > 0.5 - the paper's rule;
argmax Q for DQN). It is scored by ``agents.evaluate.evaluate`` on dev (and test).

Writes runs/sb3/<name>/{model.zip, obs_norm.npz, sb3_policy.json, results.json} and
TensorBoard logs under runs/tb/sb3/<name> (SB3's own scalars plus charts/mean_reward,
charts/avg_exit_layer_train and eval/dev_* with the same names as REINFORCE).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecNormalize

import cee_env  # noqa: F401  (registers cee/<Task>-v0)
from agents.runtime import DataArgs, check_inputs, policy_record, run_folders, run_name, thin
from backbones.files import summary_writer, write_json
from agents.evaluate import evaluate
from agents.policies import ExitPolicy, OracleExit, StaticExit
from agents.reinforce import log_eval, make_caches, print_summary, register_task_file
from backbones.cli import parse, user_errors
from cee_env.cache import LayerCache
from cee_env.env import EXIT, EarlyExitEnv, check_env_args
from cee_env.observations import obs_size, observe, uses_states

ALGOS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "dqn": DQN}
DEFAULT_TIMESTEPS = {"ppo": 300_000, "a2c": 300_000, "dqn": 150_000}
NORMALIZE = ("cache", "running", "none")
OBS = "state_layer"  # the default observation mode of the SB3 agents


@dataclass
class Args(DataArgs):
    algo: str = "ppo"
    """SB3 algorithm: ppo, a2c or dqn"""
    env: str = "cee/RTE-v0"
    """environment id (cee/<Task>-v0 or cee/Synthetic-v0)"""
    reward: str = "hardness"
    """hardness (Eq 4), vanilla (Eq 3) or hardness_weighted (the alternative reading of Eq 4)"""
    alpha: float = 0.05
    """depth penalty per layer (t is the 1-based exit layer)"""
    obs: str = OBS
    """the env's observation mode: state_layer (s_l and a one-hot of l), state, state_probs, confidence or state_confidence"""
    total_timesteps: int | None = None
    """env steps (one step = one layer decision of one instance) to train for (default per algo: ppo and a2c
    300k, dqn 150k - about 1-2 minutes each on an RTE-size cache on 2 CPU cores)"""
    n_envs: int = 8
    """copies of the env in SB3's DummyVecEnv (all share the loaded training cache)"""
    learning_rate: float | None = None
    """optimizer learning rate (default per algo: ppo 3e-4, a2c 7e-4, dqn 1e-4)"""
    n_steps: int | None = None
    """PPO/A2C steps per env per rollout (default: ppo 256, a2c 8)"""
    batch_size: int | None = None
    """PPO minibatch / DQN batch size (default: ppo 256, dqn 64)"""
    ent_coef: float = 0.01
    """PPO/A2C entropy bonus"""
    gamma: float = 1.0
    """discount; the reward is terminal, so 1.0 optimises exactly the ConsistentEE objective"""
    net_arch: str = "64,64"
    """hidden layer sizes of the policy/value (or Q) network, comma-separated"""
    normalize: str = "cache"
    """observation standardisation: cache (fixed train-cache statistics), running (VecNormalize) or none"""
    obs_bound: float = 50.0
    """the env's clip bound B on states"""
    eval_every: int = 20_000
    """env steps between dev evaluations logged to TensorBoard (0: only at the end)"""
    seed: int = 0
    """random seed"""
    device: str = "cpu"
    """torch device of the SB3 model"""
    torch_threads: int = 1
    """torch intra-op threads while training (small MLPs run fastest on one)"""
    run_name: str | None = None
    """name of the run folder under runs/sb3 and runs/tb/sb3 (default: env, algo, reward, alpha, seed, then a short
    hash of the other settings that change the policy when any differs from its default)"""
    quiet: bool = False
    """no progress bar or final table"""


# ----------------------------------------------------------------------------- the exit policy
class SB3Exit(ExitPolicy):
    """An SB3 model as an exit policy: exit at layer l iff ``model.predict(obs_l, deterministic=True) == Exit``.

    ``obs_l`` is what :class:`~cee_env.EarlyExitEnv` (obs "state_layer") shows at layer l:
    s_l clipped to [-obs_bound, obs_bound], then a one-hot of l; then, when ``obs_mean``
    is given, VecNormalize's transform ``clip((obs - mean) / sqrt(var + epsilon), +-clip_obs)``.
    """

    def __init__(self, model: BaseAlgorithm, num_layers: int, obs_bound: float = 50.0,
                 obs_mean: np.ndarray | None = None, obs_var: np.ndarray | None = None,
                 clip_obs: float = 10.0, epsilon: float = 1e-8, name: str | None = None, obs: str = OBS) -> None:
        self.model, self.num_layers, self.obs_bound = model, int(num_layers), float(obs_bound)
        self.obs_mean = None if obs_mean is None else np.asarray(obs_mean, dtype=np.float64)
        self.obs_var = None if obs_var is None else np.asarray(obs_var, dtype=np.float64)
        self.clip_obs, self.epsilon = float(clip_obs), float(epsilon)
        self.name = name or f"sb3-{type(model).__name__.lower()}"
        self.obs = obs
        self.needs_states = uses_states(obs)
        self.threshold: float | None = None  # None: the greedy action; else exit when exit_probs > threshold

    @classmethod
    def from_vec_env(cls, model: BaseAlgorithm, vec_env, num_layers: int, obs_bound: float,
                     name: str | None = None, obs: str = OBS) -> "SB3Exit":
        """Take the normalisation (if any) from the VecNormalize the model was trained in (a snapshot)."""
        if isinstance(vec_env, VecNormalize) and vec_env.norm_obs:
            rms = vec_env.obs_rms
            return cls(model, num_layers, obs_bound, rms.mean.copy(), rms.var.copy(), vec_env.clip_obs,
                       vec_env.epsilon, name, obs)
        return cls(model, num_layers, obs_bound, name=name, obs=obs)

    def env_observations(self, states: np.ndarray | None, log_probs: np.ndarray) -> np.ndarray:
        """The env's raw observations at layers 1..l from the prefix states [B, l, H] / log-probs [B, l, C]."""
        return observe(states, log_probs, self.obs, self.num_layers, self.obs_bound)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """VecNormalize's observation transform (identity without statistics)."""
        if self.obs_mean is None:
            return obs
        out = np.clip((obs - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon), -self.clip_obs, self.clip_obs)
        return out.astype(np.float32)

    def exit_at_layer(self, l, states, log_probs):
        if self.threshold is not None:
            return self.exit_probs(states, log_probs)[:, l] > self.threshold
        obs = self.normalize(self.env_observations(states, log_probs)[:, l])
        actions, _ = self.model.predict(obs, deterministic=True)
        return np.asarray(actions).reshape(-1) == EXIT

    def stepper(self):
        """Layer-by-layer decisions in numpy (:mod:`agents.policies.stepper`), equal to :meth:`exit_at_layer`'s;
        None when the network holds a module the numpy path does not know (a custom features extractor)."""
        from agents.policies.stepper import MLP, DecisionSpec, Stepper, mlp_from_sequential

        pol = self.model.policy
        q = hasattr(pol, "q_net")
        mods = ([pol.q_net.features_extractor, pol.q_net.q_net] if q else
                [pol.pi_features_extractor, pol.mlp_extractor.policy_net, pol.action_net])
        layers = mlp_from_sequential(mods)
        if layers is None:
            return None
        mlp, thr = MLP(layers), self.threshold

        def decide(l: int, obs: np.ndarray) -> np.ndarray:
            out = mlp(np.asarray(self.normalize(obs), dtype=np.float32))
            if thr is None:  # the greedy action (ties: the first, Continue)
                return out.argmax(-1) == EXIT
            if q:
                p = np.float32(1.0) / (np.float32(1.0) + np.exp(out[:, 1 - EXIT] - out[:, EXIT]))
            else:
                e = np.exp(out - out.max(-1, keepdims=True))
                p = e[:, EXIT] / e.sum(-1)
            return p > thr

        head = "argmax" if thr is None else "qdiff" if q else "softmax"
        norm = {} if self.obs_mean is None else {"shift": self.obs_mean.astype(np.float32), "clip": self.clip_obs,
                                                 "scale": np.sqrt(self.obs_var + self.epsilon).astype(np.float32)}
        spec = DecisionSpec(layers, head, thr, exit_index=EXIT, **norm)
        return Stepper(self.obs, self.num_layers, decide, self.obs_bound, spec=lambda l: spec)

    @torch.no_grad()
    def exit_probs(self, states: np.ndarray | None, log_probs: np.ndarray) -> np.ndarray:
        """A score in [0, 1] per instance and layer [N, L] whose 0.5 crossing is the greedy action:
        pi(Exit | o_l) for PPO / A2C, sigmoid(Q(o_l, Exit) - Q(o_l, Continue)) for DQN."""
        o = self.normalize(self.env_observations(states, log_probs))
        n, L, d = o.shape
        x = torch.as_tensor(o.reshape(n * L, d), device=self.model.device)
        pol = self.model.policy
        if hasattr(pol, "q_net"):
            q = pol.q_net(x)
            p = torch.sigmoid(q[:, EXIT] - q[:, 1 - EXIT])
        else:
            p = pol.get_distribution(x).distribution.probs[:, EXIT]
        return p.float().cpu().numpy().reshape(n, L)

    # ------------------------------------------------------------------ save / load
    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        """Write the policy without pickle: ``sb3_policy.safetensors`` (SB3's ``model.policy.state_dict()``
        under ``policy.``, the normalisation statistics as ``obs_mean``/``obs_var``) and ``sb3_policy.json``
        (algorithm, network, observation mode and size, their sha256, ``extra``). NaN/inf parameters are
        refused before anything is written. SB3's own ``model.zip`` is written too, for SB3's tools (e.g.
        training on); :meth:`load` never reads it unless told the folder is trusted."""
        from backbones.files import save_tensors, stored_path, write_json, write_with

        out = Path(out_dir)
        tensors = {f"policy.{k}": v for k, v in self.model.policy.state_dict().items()}
        if self.obs_mean is not None:
            tensors.update(obs_mean=torch.from_numpy(self.obs_mean), obs_var=torch.from_numpy(self.obs_var))
        sha = save_tensors(out / SB3_WEIGHTS, tensors, "the SB3 policy's parameters")
        write_with(out / "model.zip", lambda tmp: self.model.save(tmp))  # the name has a suffix: SB3 appends none
        (out / "obs_norm.npz").unlink(missing_ok=True)  # the statistics live in the safetensors file now
        cfg = {"algo": type(self.model).__name__.lower(), "num_layers": self.num_layers,
               "obs_bound": self.obs_bound, "obs": self.obs,
               "obs_size": int(np.prod(self.model.observation_space.shape)),
               "n_actions": int(self.model.action_space.n), "policy_kwargs": _kwargs_to_json(self.model.policy_kwargs),
               "normalize": None if self.obs_mean is None else {"clip_obs": self.clip_obs, "epsilon": self.epsilon},
               "name": self.name, **(extra or {})}
        if cfg.get("checkpoint"):
            cfg["checkpoint"] = stored_path(cfg["checkpoint"])
        write_json(out / "sb3_policy.json", {**cfg, "sha256": {SB3_WEIGHTS: sha}}, indent=2)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", trust_pickle: bool = False) -> "SB3Exit":
        """Rebuild the policy from ``sb3_policy.safetensors`` + ``sb3_policy.json``: the algorithm is
        constructed on a stand-in env with the saved observation size and the parameters loaded into
        its policy (nothing unpickled; sha256 and NaN/inf checked). A run with only SB3's ``model.zip``
        (older runs) is refused unless ``trust_pickle``: unpickling runs code from the folder."""
        from backbones.files import IntegrityError, load_tensors, read_json

        d = Path(run_dir)
        fix = f"the SB3 policy in {d} cannot be trusted: train it again (python -m agents.sb3) or restore the folder"
        cfg = read_json(d / "sb3_policy.json", fix)
        if cfg.get("algo") not in ALGOS:
            raise IntegrityError(f"{d / 'sb3_policy.json'}: unknown algo {cfg.get('algo')!r}; {fix}")
        if (d / SB3_WEIGHTS).is_file():
            tensors = load_tensors(d / SB3_WEIGHTS, cfg.get("sha256", {}).get(SB3_WEIGHTS), fix)
            model = _rebuild_model(cfg, {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")}, device,
                                   d / SB3_WEIGHTS, fix)
            norm = {}
            if "obs_mean" in tensors:
                norm = dict(obs_mean=tensors["obs_mean"].numpy(), obs_var=tensors["obs_var"].numpy(),
                            clip_obs=cfg["normalize"]["clip_obs"], epsilon=cfg["normalize"]["epsilon"])
        elif (d / "model.zip").is_file():
            if not trust_pickle:
                raise ValueError(f"{d} holds an SB3 model.zip only (an older run); loading it unpickles, which runs "
                                 "any code its author put there. Pass --trust-pickle (trust_pickle=True) only if you "
                                 "trust who wrote the folder, or train the policy again with python -m agents.sb3")
            model = ALGOS[cfg["algo"]].load(d / "model.zip", device=device)
            norm = {}
            if (d / "obs_norm.npz").is_file():
                z = np.load(d / "obs_norm.npz")  # allow_pickle=False (numpy's default): arrays only
                norm = dict(obs_mean=z["mean"], obs_var=z["var"], clip_obs=float(z["clip_obs"]),
                            epsilon=float(z["epsilon"]))
        else:
            raise FileNotFoundError(f"{d} has sb3_policy.json but no {SB3_WEIGHTS}; {fix}")
        return cls(model, cfg["num_layers"], cfg["obs_bound"], name=cfg.get("name"), obs=cfg.get("obs", OBS), **norm)


SB3_WEIGHTS = "sb3_policy.safetensors"


def _kwargs_to_json(kwargs: dict) -> dict:
    """The policy_kwargs that shape the network, as JSON (optimizer settings only matter for training)."""
    out = {}
    for k, v in kwargs.items():
        if k.startswith("optimizer"):
            continue
        if k == "activation_fn":
            out[k] = v.__name__  # a torch.nn class
        elif isinstance(v, (bool, int, float, str, list, dict, type(None))):
            out[k] = v
        else:
            raise ValueError(f"SB3Exit.save stores policy_kwargs as JSON; {k}={v!r} is not supported")
    return out


def _rebuild_model(cfg: dict, state: dict, device: str, file: Path, fix: str) -> BaseAlgorithm:
    """The algorithm of ``cfg`` constructed on a stand-in env with the saved spaces, ``state`` loaded into its policy."""
    import gymnasium as gym

    from backbones.files import IntegrityError

    class SpacesEnv(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (int(cfg["obs_size"]),), np.float32)
        action_space = gym.spaces.Discrete(int(cfg.get("n_actions", 2)))

        def reset(self, *, seed=None, options=None):
            return np.zeros(self.observation_space.shape, np.float32), {}

        def step(self, action):
            return np.zeros(self.observation_space.shape, np.float32), 0.0, True, False, {}

    kwargs = dict(cfg.get("policy_kwargs") or {})
    if "activation_fn" in kwargs:
        kwargs["activation_fn"] = getattr(torch.nn, kwargs["activation_fn"])
    small = {"ppo": dict(n_steps=2, batch_size=2), "a2c": dict(n_steps=1), "dqn": dict(buffer_size=1, learning_starts=0)}
    model = ALGOS[cfg["algo"]]("MlpPolicy", SpacesEnv(), device=device, policy_kwargs=kwargs, **small[cfg["algo"]])
    try:
        model.policy.load_state_dict(state)
    except RuntimeError as e:
        raise IntegrityError(f"{file} does not fit the network sb3_policy.json describes ({e}); {fix}") from None
    return model


# ----------------------------------------------------------------------------- training
class ExitLogger(BaseCallback):
    """Logs finished episodes' mean reward (charts/mean_reward) and exit layer, records the reward
    curve [(env_steps, mean_reward)], and evaluates the current policy on dev every ``eval_every`` steps."""

    def __init__(self, writer, make_policy, dev: LayerCache | None, log_every: int, eval_every: int) -> None:
        super().__init__()
        self.writer, self.make_policy, self.dev = writer, make_policy, dev
        self.log_every, self.eval_every = max(1, log_every), eval_every
        self.curve: list[tuple[int, float]] = []
        self.episodes = 0
        self._rets: list[float] = []
        self._layers: list[int] = []

    def _on_training_start(self) -> None:
        self._acc = np.zeros(self.training_env.num_envs)
        self._next_log = self.log_every
        self._next_eval = self.eval_every if self.eval_every > 0 else None

    def _on_step(self) -> bool:
        rewards, dones, infos = self.locals["rewards"], self.locals["dones"], self.locals["infos"]
        self._acc += rewards
        for i in np.flatnonzero(dones):
            self._rets.append(float(self._acc[i]))
            self._layers.append(int(infos[i]["layer"]))
            self._acc[i] = 0.0
        t = self.num_timesteps
        if t >= self._next_log:
            self._flush(t)
            self._next_log = t - t % self.log_every + self.log_every
        if self._next_eval is not None and t >= self._next_eval and self.dev is not None:
            log_eval(self.writer, "dev", evaluate(self.make_policy(), self.dev), t)
            self._next_eval = t - t % self.eval_every + self.eval_every
        return True

    def _on_training_end(self) -> None:
        self._flush(self.num_timesteps)

    def _flush(self, t: int) -> None:
        if not self._rets:
            return
        r, layer = float(np.mean(self._rets)), float(np.mean(self._layers))
        self.episodes += len(self._rets)
        self.curve.append((int(t), r))
        self.writer.add_scalar("charts/mean_reward", r, t)
        self.writer.add_scalar("charts/avg_exit_layer_train", layer, t)
        self._rets, self._layers = [], []


def algo_kwargs(args: Args) -> dict:
    """Hyperparameters passed to the SB3 constructor (defaults filled per algorithm)."""
    arch = [int(x) for x in args.net_arch.split(",") if x.strip()]
    kw: dict = {"gamma": args.gamma, "policy_kwargs": {"net_arch": arch}}
    if args.algo == "ppo":
        kw.update(learning_rate=args.learning_rate or 3e-4, n_steps=args.n_steps or 256,
                  batch_size=args.batch_size or 256, n_epochs=10, gae_lambda=0.95, ent_coef=args.ent_coef)
    elif args.algo == "a2c":
        kw.update(learning_rate=args.learning_rate or 7e-4, n_steps=args.n_steps or 8, ent_coef=args.ent_coef,
                  gae_lambda=1.0)
    else:  # dqn: one gradient step per 4 transitions, target net every 2k steps, 30% of training exploring
        kw.update(learning_rate=args.learning_rate or 1e-4, batch_size=args.batch_size or 64,
                  buffer_size=min(100_000, args.total_timesteps), learning_starts=min(1_000, args.total_timesteps // 10),
                  train_freq=1, gradient_steps=max(1, args.n_envs // 4), target_update_interval=2_000,
                  exploration_fraction=0.3, exploration_final_eps=0.02)
    return kw


def cache_obs_stats(cache: LayerCache, obs_bound: float, obs: str = OBS) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of an observation mode over a cache: the (clipped) state part is
    standardised; the other features (all in [0, 1]) get mean 0, variance 1 (left as they are)."""
    L, H, C = cache.num_layers, cache.hidden_size, cache.num_classes
    d = obs_size(obs, H, L, C)
    mean, var = np.zeros(d), np.ones(d)
    if uses_states(obs):
        flat = np.clip(np.asarray(cache.states, dtype=np.float64).reshape(-1, H), -obs_bound, obs_bound)
        mean[:H], var[:H] = flat.mean(0), (flat.std(0) + 1e-4) ** 2
    return mean, var


def make_train_env(args: Args, cache: LayerCache):
    """DummyVecEnv of ``n_envs`` EarlyExitEnv copies over ``cache`` (each with a Monitor), wrapped in
    VecNormalize unless ``normalize == "none"``."""
    kwargs = dict(cache=cache, split="train", reward=args.reward, alpha=args.alpha, obs=args.obs, obs_bound=args.obs_bound)
    venv = make_vec_env(EarlyExitEnv, n_envs=args.n_envs, seed=args.seed, env_kwargs=kwargs)
    if args.normalize == "none":
        return venv
    if args.normalize == "running":
        return VecNormalize(venv, norm_obs=True, norm_reward=False, gamma=args.gamma)
    vn = VecNormalize(venv, training=False, norm_obs=True, norm_reward=False, gamma=args.gamma)
    vn.obs_rms.mean, vn.obs_rms.var = cache_obs_stats(cache, args.obs_bound, args.obs)
    return vn


def sb3_run_name(args: Args) -> str:
    return run_name(args, f"{args.env.split('/')[-1]}-{args.algo}-{args.reward}-a{args.alpha:g}-s{args.seed}",
                    ("env", "algo", "reward", "alpha", "seed"))


def train(args: Args, caches: dict[str, LayerCache] | None = None) -> dict:
    """Train an SB3 agent; returns {"policy": SB3Exit, "model", "results": {...}, "run_dir": Path}."""
    if args.algo not in ALGOS:
        raise ValueError(f"--algo must be one of {tuple(ALGOS)}; got {args.algo!r}")
    check_env_args(args.reward, args.alpha, args.obs, args.obs_bound, flag="--")
    if args.normalize not in NORMALIZE:
        raise ValueError(f"--normalize must be one of {NORMALIZE}; got {args.normalize!r}")
    check_inputs(args)
    register_task_file(args)
    name = sb3_run_name(args)  # before the default steps are filled in: defaults add no hash
    if args.total_timesteps is None:
        args = replace(args, total_timesteps=DEFAULT_TIMESTEPS[args.algo])
    if args.total_timesteps < 1 or args.n_envs < 1:
        raise ValueError("--total-timesteps and --n-envs must be >= 1")
    run_dir, tb_dir = run_folders("sb3", name)
    caches = caches or make_caches(args)
    train_cache, dev_cache = caches["train"], caches.get("dev")
    L = train_cache.num_layers

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.torch_threads))
    try:
        venv = make_train_env(args, train_cache)
        model = ALGOS[args.algo]("MlpPolicy", venv, seed=args.seed, device=args.device, verbose=0, **algo_kwargs(args))
        writer = summary_writer(tb_dir)  # (first: an unwritable folder is named before SB3 touches it)
        model.set_logger(configure(str(tb_dir), ["tensorboard"]))
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        make_policy = lambda: SB3Exit.from_vec_env(model, venv, L, args.obs_bound, f"sb3-{args.algo}", args.obs)  # noqa: E731
        cb = ExitLogger(writer, make_policy, dev_cache, log_every=max(args.n_envs, args.total_timesteps // 200),
                        eval_every=args.eval_every)
        t0 = time.time()
        model.learn(total_timesteps=args.total_timesteps, callback=cb, progress_bar=not args.quiet)
        seconds = time.time() - t0
        policy = make_policy()
        venv.close()

        results = {"args": asdict(args), "algo": args.algo, "train_split": train_cache.split,
                   "train_instances": train_cache.num_instances, "train_seconds": round(seconds, 1),
                   "env_steps": int(model.num_timesteps), "episodes": cb.episodes, "reward_curve": thin(cb.curve)}
        for split, cache in caches.items():
            if split == "train" or not cache.has_labels:
                continue
            rows = [evaluate(p, cache) for p in (StaticExit(L), policy, OracleExit())]
            log_eval(writer, split, rows[1], int(model.num_timesteps))
            results[split] = {r.policy: r.to_dict() for r in rows}
        writer.close()
    finally:
        torch.set_num_threads(threads)
    policy.save(run_dir, extra=policy_record(train_cache, env=args.env, reward=args.reward, alpha=args.alpha))
    write_json(run_dir / "results.json", results)
    if not args.quiet:
        print_summary(results, run_dir)
    return {"policy": policy, "model": model, "results": results, "run_dir": run_dir}


def parse_args(argv=None) -> Args:
    return parse(Args, argv, __doc__)


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()

