"""Tokenisation, dynamic-padding batches, and one pass of a multi-exit model over a dataset."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase


class Encoded(Dataset):
    """A tokenised split: one dict of token ids per instance, plus its label and row index."""

    def __init__(self, ds, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        b = ds["text_b"] if "text_b" in ds.column_names else [""] * len(ds)
        pairs = any(bool(x) for x in b)
        enc = tokenizer(
            list(ds["text_a"]), list(b) if pairs else None, truncation=True, max_length=max_length
        )
        self.features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(ds))]
        self.labels = np.asarray(ds["label"], dtype=np.int64)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.features)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per instance."""
        return np.fromiter((len(f["input_ids"]) for f in self.features), dtype=np.int64, count=len(self.features))

    def __getitem__(self, i: int) -> dict:
        return {**self.features[i], "labels": int(self.labels[i]), "idx": i}

    def collate(self, rows: list[dict]) -> dict:
        extra = {k: torch.tensor([r.pop(k) for r in rows]) for k in ("labels", "idx")}
        batch = self.tokenizer.pad(rows, return_tensors="pt")
        return {**dict(batch), **extra}

    def loader(self, batch_size: int, indices=None, **kw) -> DataLoader:
        data = self if indices is None else torch.utils.data.Subset(self, list(indices))
        return DataLoader(data, batch_size=batch_size, collate_fn=self.collate, **kw)


def length_grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                         mega: int = 50) -> np.ndarray:
    """A random order whose consecutive ``batch_size`` chunks hold instances of similar length.

    Shuffle, cut into mega-batches of ``mega`` batches, sort each by length, cut into
    batches and shuffle the full batches (the short last one stays last): batches stay
    random, padding shrinks (the grouping of Hugging Face's ``group_by_length``).
    """
    lengths = np.asarray(lengths)
    perm = rng.permutation(len(lengths))
    size = mega * batch_size
    order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                            for c in (perm[i:i + size] for i in range(0, len(perm), size))]) if len(perm) else perm
    full = len(order) // batch_size
    batches = order[: full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), order[full * batch_size:]])


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def shard_rows(order: np.ndarray, batch_size: int, rank: int, world: int) -> np.ndarray:
    """The rows of process ``rank`` of ``world`` when the batches of ``order`` (consecutive ``batch_size``
    chunks) are dealt out in turn: every process runs whole batches of the one-process pass, so each
    instance is padded and computed exactly as there."""
    starts = range(rank * batch_size, len(order), world * batch_size)
    return np.concatenate([order[i:i + batch_size] for i in starts]) if len(starts) else order[:0]


@torch.no_grad()
def run_all_layers(model, encoded: Encoded, batch_size: int = 64, states: bool = False, desc: str | None = None,
                   shard: tuple[int, int] | None = None):
    """Every internal classifier on every instance: log-probs [N, L, C] (and states [N, L, H]).

    ``shard=(rank, world)``: only this process's batches (:func:`shard_rows`); returns ``(rows, log-probs,
    states or None)`` for those rows in that order (arrays None when the process got no batch)."""
    model.eval()
    device = next(model.parameters()).device
    logps, sts = [], []
    order = np.argsort(-encoded.lengths, kind="stable")  # similar lengths together: less padding
    if shard is not None:
        order = shard_rows(order, batch_size, *shard)
    for batch in tqdm(encoded.loader(batch_size, indices=order), desc=desc, disable=desc is None, leave=False):
        out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}, return_states=states)
        logits, st = out if states else (out, None)
        logps.append(torch.log_softmax(logits.float(), -1).cpu().numpy())
        if states:
            sts.append(st.float().cpu().numpy())
    if shard is not None:
        return order, (np.concatenate(logps) if logps else None), (np.concatenate(sts) if sts else None)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    logp = np.concatenate(logps)[inv]
    return (logp, np.concatenate(sts)[inv]) if states else logp
