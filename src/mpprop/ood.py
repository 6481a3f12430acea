"""Out-of-distribution score: how far a crystal's embedding (CrystalGraphConvNet.embed, the
vector the output layer reads) lies from the training materials'.

score = mean distance to the k nearest training embeddings / the same quantity for the
training materials themselves (leave-one-out mean over a reference subsample), so ~1 means
"as close to the training set as a training material is"; the flag threshold is a quantile
of the validation materials' scores, set at training time and stored with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class OODReference:
    embeddings: np.ndarray  # (R, d) float32, a seeded subsample of the training embeddings
    k: int
    scale: float  # mean k-NN distance of the reference materials among themselves
    threshold: float  # score above which a prediction is flagged

    @classmethod
    def fit(cls, train_emb: np.ndarray, val_emb: np.ndarray, k: int, quantile: float,
            max_reference: int, seed: int) -> OODReference:
        rng = np.random.default_rng(seed)
        ref = train_emb if len(train_emb) <= max_reference else train_emb[
            np.sort(rng.choice(len(train_emb), max_reference, replace=False))]
        ref = np.ascontiguousarray(ref, dtype=np.float32)
        k = max(1, min(int(k), len(ref) - 1))
        own = knn_mean_distance(ref, ref, k, exclude_self=True)
        scale = float(np.mean(own)) if len(own) and np.mean(own) > 0 else 1.0
        probe = cls(ref, k, scale, float("inf"))
        threshold = float(np.quantile(probe.scores(val_emb), quantile)) if len(val_emb) else float("inf")
        return cls(ref, k, scale, threshold)

    def scores(self, emb: np.ndarray) -> np.ndarray:
        return knn_mean_distance(np.asarray(emb, np.float32), self.embeddings, self.k) / self.scale

    def state_dict(self) -> dict:
        return {"embeddings": torch.from_numpy(self.embeddings), "k": self.k,
                "scale": self.scale, "threshold": self.threshold}

    @classmethod
    def from_state(cls, state: dict) -> OODReference:
        return cls(state["embeddings"].numpy().astype(np.float32), int(state["k"]),
                   float(state["scale"]), float(state["threshold"]))


def knn_mean_distance(query: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool = False,
                      chunk: int = 1024) -> np.ndarray:
    """Mean Euclidean distance of each query row to its k nearest rows of `ref`."""
    out = np.empty(len(query), dtype=np.float64)
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, np.float32))
    kk = min(k + int(exclude_self), len(ref))
    for lo in range(0, len(query), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query[lo:lo + chunk], np.float32))
        d = torch.cdist(q, ref_t)
        nearest = torch.topk(d, kk, dim=1, largest=False).values
        if exclude_self:
            nearest = nearest[:, 1:]
        out[lo:lo + len(q)] = nearest.mean(dim=1).double().numpy()
    return out
