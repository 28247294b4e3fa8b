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

    def __getitem__(self, i: int) -> dict:
        return {**self.features[i], "labels": int(self.labels[i]), "idx": i}

    def collate(self, rows: list[dict]) -> dict:
        extra = {k: torch.tensor([r.pop(k) for r in rows]) for k in ("labels", "idx")}
        batch = self.tokenizer.pad(rows, return_tensors="pt")
        return {**dict(batch), **extra}

    def loader(self, batch_size: int, indices=None, **kw) -> DataLoader:
        data = self if indices is None else torch.utils.data.Subset(self, list(indices))
        return DataLoader(data, batch_size=batch_size, collate_fn=self.collate, **kw)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


@torch.no_grad()
def run_all_layers(model, encoded: Encoded, batch_size: int = 64, states: bool = False, desc: str | None = None):
    """Every internal classifier on every instance: log-probs [N, L, C] (and states [N, L, H])."""
    model.eval()
    logps, sts = [], []
    for batch in tqdm(encoded.loader(batch_size), desc=desc, disable=desc is None, leave=False):
        out = model(**model_inputs(batch), return_states=states)
        logits, st = out if states else (out, None)
        logps.append(torch.log_softmax(logits.float(), -1).numpy())
        if states:
            sts.append(st.float().numpy())
    logp = np.concatenate(logps)
    return (logp, np.concatenate(sts)) if states else logp
