"""Heuristic and learned-to-exit baselines, as :class:`~agents.policies.ExitPolicy` objects.

All of them run on the same stage-1 multi-exit backbone (its cached layer states
and log-probabilities) and are scored by the one evaluator, :func:`agents.evaluate.evaluate`.
Each exposes one knob that trades accuracy for speed:

- :class:`EntropyExit` (DeeBERT, Xin et al. 2020): exit at layer l when the entropy
  (natural log) of p_l(.|x) is *below* ``threshold``. Threshold 0 never exits early.
- :class:`MaxProbExit` (Right-Tool, Schwartz et al. 2020): exit when max_c p_l(c|x)
  is *above* ``threshold``. Threshold 1 never exits early.
- :class:`PatienceExit` (PABEE, Zhou et al. 2020), the patience counting of PABEE's
  ``BertModel.forward`` (JetRunner/PABEE, pabee/modeling_bert.py): a counter starts
  at 0; at every layer after the first it is incremented when the layer's argmax
  equals the previous layer's and reset to 0 otherwise; the instance exits as soon
  as the counter equals ``patience``. So with patience p >= 1 an instance exits at
  the first 1-based layer l >= p + 1 whose prediction equals the predictions of the
  p layers before it (p + 1 identical predictions in a row); layer 1 can never exit,
  and p >= L - 1 is the full-depth model. Patience 0 means "no early exit" in
  PABEE's code (its ``patience == 0`` branch runs all layers); it does here too.
- :class:`BerxitExit` (BERxiT learning-to-exit, Xin et al. 2021): one LTE module
  shared by all layers, a Linear(H, 1) + sigmoid on the layer's pooled state (the
  state its internal classifier reads). BERxiT's code (castorini/berxit,
  ``all-singlelayer-jlte``) regresses it with MSE onto 1 - correctness of the
  layer's prediction and exits when the output (an "uncertainty") is below a
  threshold. Here the head outputs the complement, a correctness score
  q_l = P(prediction at l is right), trained on the *train* cache with MSE
  (BERxiT's loss, default) or BCE; the instance exits when q_l > ``threshold``,
  which is BERxiT's rule with threshold_here = 1 - threshold_BERxiT. Difference
  from BERxiT: the backbone is frozen, so the head is fitted after stage 1 rather
  than jointly with it. Inputs are standardised with train-cache statistics (an
  affine change of the input, so the function class is still a linear+sigmoid).

Static exit at layer k and the oracle (first correct layer) live in
:mod:`agents.policies`. Every class here overrides ``exit_mask`` with a vectorised
form that agrees exactly with its layer-by-layer ``exit_at_layer``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from agents.policies.base import ExitPolicy
from cee_env.cache import LayerCache


# --------------------------------------------------------------------------- score functions (shared by both paths)
def prediction_entropy(log_probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of softmax outputs given as log-probabilities [..., C] -> [...] (float64)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    return -(p * np.where(p > 0, lp, 0.0)).sum(-1)


def max_prob(log_probs: np.ndarray) -> np.ndarray:
    """Top class probability [..., C] -> [...] (float64)."""
    return np.exp(np.asarray(log_probs, dtype=np.float64).max(-1))


def patience_counters(preds: np.ndarray) -> np.ndarray:
    """PABEE's counter after each layer: int [N, L] from argmax predictions [N, L].

    counter[:, 0] = 0; counter[:, l] = counter[:, l-1] + 1 if preds[:, l] == preds[:, l-1] else 0.
    """
    preds = np.asarray(preds)
    out = np.zeros(preds.shape, dtype=np.int64)
    for l in range(1, preds.shape[1]):
        out[:, l] = np.where(preds[:, l] == preds[:, l - 1], out[:, l - 1] + 1, 0)
    return out


def _last_true(mask: np.ndarray) -> np.ndarray:
    mask[:, -1] = True
    return mask


# --------------------------------------------------------------------------- rules on the classifiers' outputs
class EntropyExit(ExitPolicy):
    """DeeBERT: exit when the entropy of p_l(.|x) is below ``threshold`` (nats)."""

    needs_states = False

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.name = f"deebert-{self.threshold:.4g}"

    def exit_at_layer(self, l, states, log_probs):
        return prediction_entropy(log_probs[:, l]) < self.threshold

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        return _last_true(prediction_entropy(cache.log_probs) < self.threshold)


class MaxProbExit(ExitPolicy):
    """Right-Tool / max-probability: exit when max_c p_l(c|x) is above ``threshold``."""

    needs_states = False

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.name = f"maxprob-{self.threshold:.4g}"

    def exit_at_layer(self, l, states, log_probs):
        return max_prob(log_probs[:, l]) > self.threshold

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        return _last_true(max_prob(cache.log_probs) > self.threshold)


class PatienceExit(ExitPolicy):
    """PABEE: exit once the prediction has stayed the same for ``patience`` consecutive layer transitions.

    See the module docstring for the exact counting; ``patience`` 0 runs all layers.
    """

    needs_states = False

    def __init__(self, patience: int) -> None:
        if int(patience) < 0:
            raise ValueError(f"patience must be >= 0; got {patience}")
        self.patience = int(patience)
        self.name = f"pabee-{self.patience}"

    def exit_at_layer(self, l, states, log_probs):
        if self.patience == 0:
            return np.zeros(log_probs.shape[0], dtype=bool)
        counter = patience_counters(np.asarray(log_probs).argmax(-1))[:, l]
        # The loop breaks the first time counter == patience; counters grow by 1, so ">=" marks
        # the same first layer (and later layers, which the evaluator never reaches).
        return counter >= self.patience

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        n, L = cache.num_instances, cache.num_layers
        if self.patience == 0:
            return _last_true(np.zeros((n, L), dtype=bool))
        return _last_true(patience_counters(cache.preds) >= self.patience)


# --------------------------------------------------------------------------- BERxiT learning-to-exit
class LTEHead(nn.Module):
    """BERxiT's LTE module: one Linear(H, 1) + sigmoid shared by all layers, on standardised states.

    Its output is a correctness score q = P(the layer's prediction is right).
    """

    def __init__(self, state_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(state_dim, 1)
        self.register_buffer("mean", torch.zeros(state_dim))
        self.register_buffer("std", torch.ones(state_dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Logits for states [..., H] -> [...]."""
        return self.linear((states - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def score(self, states: np.ndarray) -> np.ndarray:
        """q for states [B, H] -> [B] (float64). Always called on one layer's [B, H] block, so the
        per-layer and the whole-cache paths do the same arithmetic."""
        x = torch.from_numpy(np.array(states, dtype=np.float32, order="C"))  # a writable contiguous copy
        return torch.sigmoid(self(x)).double().numpy()


@dataclass
class LTEConfig:
    loss: str = "mse"
    """mse: regression onto correctness, as BERxiT's code; bce: logistic regression"""
    epochs: int = 20
    """passes over the N*L (state, correct) pairs of the train cache"""
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def train_lte(cache: LayerCache, config: LTEConfig | None = None) -> LTEHead:
    """Fit the shared LTE head on ``cache`` (a labelled train cache): every layer's state vs
    whether that layer's prediction is correct."""
    c = config or LTEConfig()
    if c.loss not in ("mse", "bce"):
        raise ValueError(f"LTE loss must be 'mse' or 'bce'; got {c.loss!r}")
    if not cache.has_labels:
        raise ValueError(f"{cache.task}/{cache.split} has no labels; the LTE head needs correctness targets")
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    n, L, H = cache.num_instances, cache.num_layers, cache.hidden_size
    x = torch.from_numpy(np.array(cache.states, dtype=np.float32).reshape(n * L, H))  # a writable copy
    y = torch.as_tensor((cache.preds == np.asarray(cache.labels)[:, None]).reshape(-1), dtype=torch.float32)
    head = LTEHead(H)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0) + 1e-4)
    opt = torch.optim.Adam(head.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    for _ in range(c.epochs):
        order = torch.as_tensor(rng.permutation(n * L))
        for b in range(0, n * L, c.batch_size):
            idx = order[b:b + c.batch_size]
            logits = head(x[idx])
            if c.loss == "bce":
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
            else:
                loss = nn.functional.mse_loss(torch.sigmoid(logits), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


class BerxitExit(ExitPolicy):
    """BERxiT learning-to-exit: exit when the LTE head's correctness score q_l is above ``threshold``."""

    needs_states = True

    def __init__(self, head: LTEHead, threshold: float) -> None:
        self.head, self.threshold = head, float(threshold)
        self.name = f"berxit-{self.threshold:.4g}"

    def exit_at_layer(self, l, states, log_probs):
        return self.head.score(states[:, l]) > self.threshold

    def scores(self, cache: LayerCache) -> np.ndarray:
        """q for every instance and layer: [N, L]."""
        return np.stack([self.head.score(cache.states[:, l]) for l in range(cache.num_layers)], axis=1)

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        return _last_true(self.scores(cache) > self.threshold)


# --------------------------------------------------------------------------- knob grids
def threshold_grid(values: np.ndarray, lo: float, hi: float, n: int = 41) -> list[float]:
    """Thresholds for a score sweep: ``n`` evenly spaced in [lo, hi] plus ``n`` quantiles of
    ``values`` (scores on the train cache), sorted and de-duplicated (rounded to 6 digits)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    grid = np.linspace(lo, hi, n)
    if v.size:
        grid = np.concatenate([grid, np.quantile(v, np.linspace(0, 1, n))])
    return sorted({round(float(t), 6) for t in grid})
