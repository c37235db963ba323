"""Small torch fitters for the probes: a multinomial logistic probe and k-means (no scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int


@dataclass(frozen=True)
class LinearProbe:
    """A fitted logistic probe; features are standardised with the training mean and std."""

    weight: Float[torch.Tensor, "n_classes dim"]
    bias: Float[torch.Tensor, " n_classes"]
    mean: Float[torch.Tensor, " dim"]
    std: Float[torch.Tensor, " dim"]

    def logits(self, x: Float[torch.Tensor, "n dim"]) -> Float[torch.Tensor, "n n_classes"]:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: Float[torch.Tensor, "n dim"]) -> Int[torch.Tensor, " n"]:
        return self.logits(x).argmax(-1)


def fit_logistic(x: Float[torch.Tensor, "n dim"], y: Int[torch.Tensor, " n"], *, n_classes: int | None = None,
                 weight_decay: float = 1e-2, balanced: bool = True, max_iter: int = 100) -> LinearProbe:
    """Fit a (multinomial) logistic regression with L2 penalty by full-batch L-BFGS.

    ``balanced`` weights each class by the inverse of its frequency, so a rare foreground counts
    as much as the background. Deterministic for given inputs.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as feature rows (>0), got {len(x)} rows and {len(y)} labels.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    x = x.float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=n_classes).float()
    class_weight = (len(y) / (n_classes * counts.clamp(min=1))) if balanced else torch.ones(n_classes)
    sample_weight = class_weight[y] / class_weight[y].sum()
    onehot = F.one_hot(y, n_classes).float()
    weight, bias = torch.zeros(n_classes, x.shape[1]), torch.zeros(n_classes)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:  # weighted cross-entropy + L2, with its gradient written by hand
        logp = (z @ weight.T + bias).log_softmax(-1)
        loss = -(sample_weight * (logp * onehot).sum(-1)).sum() + weight_decay * weight.pow(2).sum() / 2
        dlogits = sample_weight[:, None] * (logp.exp() - onehot)
        weight.grad.copy_(dlogits.T @ z + weight_decay * weight)
        bias.grad.copy_(dlogits.sum(0))
        return loss

    opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def kmeans(x: Float[torch.Tensor, "n dim"], k: int, *, n_init: int = 4, iters: int = 50, seed: int = 0
           ) -> tuple[Int[torch.Tensor, " n"], Float[torch.Tensor, "k dim"]]:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` seeded runs (lowest inertia).

    Returns (labels, centroids).
    """
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be between 1 and the number of points ({len(x)}), got {k}.")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}.")
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    best = (float("inf"), torch.zeros(0), torch.zeros(0))
    for _ in range(n_init):
        centroids = x[torch.randint(len(x), (1,), generator=gen)]
        for _ in range(1, k):  # k-means++: next centre drawn proportionally to squared distance
            d2 = torch.cdist(x, centroids).min(1).values.pow(2)
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
            centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=gen)]])
        for _ in range(iters):
            labels = torch.cdist(x, centroids).argmin(1)
            new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centroids[j] for j in range(k)])
            if torch.allclose(new, centroids):
                break
            centroids = new
        labels = torch.cdist(x, centroids).argmin(1)
        inertia = float((x - centroids[labels]).pow(2).sum())
        if inertia < best[0]:
            best = (inertia, labels, centroids)
    return best[1], best[2]
