"""Inner loops of the papers' reference code that are not plain gradient descent or Adam on the support set.

``inner_solver`` builds the configs' plain ones (training, test and inference alike); ``PullBack`` is the iMAML
authors' inner loop (``method.inner_loop=reference``), ``MiniBatches`` the Reptile
authors' (``inner.batch``); both wrap the engine's solvers.
"""

from __future__ import annotations

from dataclasses import dataclass

import bilevel as bl

__all__ = ["inner_solver", "PullBack", "MiniBatches"]


def inner_solver(kind: str, lr: float, steps: int, beta1: float = 0.9) -> bl.InnerSolver:
    """``"gd"``: gradient descent; ``"adam"``: Adam with first-moment decay ``beta1`` (Reptile's reference: 0)."""
    if kind == "adam":
        return bl.Adam(lr=lr, steps=steps, betas=(beta1, 0.999))
    return bl.GradientDescent(lr=lr, steps=steps)


@dataclass(frozen=True)
class PullBack(bl.InnerSolver):
    """The inner loop of the iMAML authors' code (aravindr93/imaml_dev, examples/omniglot_implicit_maml.py):
    ``steps`` gradient steps of size ``lr`` on ``inner_loss`` (their ``learn_task``, on the plain task loss), then
    one more step of the same size on the proximal term ``reg/2 ||w − θ||²`` alone: ``w ← w − lr·reg·(w − θ)``.

    The returned ``SolveInfo`` is that of the gradient steps. Only the call is defined (what ``Implicit`` uses);
    ``Unrolled`` would need ``run``.
    """

    lr: float = 0.1
    reg: float = 1.0

    def __call__(self, inner_loss, params0, hparams, batch):
        descent = bl.GradientDescent(lr=self.lr, steps=self.steps, tol=self.tol, rtol=self.rtol)
        params, info = descent(inner_loss, params0, hparams, batch)
        return {k: w - self.lr * self.reg * (w - hparams[k]) for k, w in params.items()}, info


@dataclass(frozen=True)
class MiniBatches(bl.InnerSolver):
    """The inner loop of the Reptile authors' code (openai/supervised-reptile, ``Reptile.train_step``): step ``i``
    of ``solver`` sees only examples ``i·size .. (i+1)·size − 1`` of the support, which the training sampler lays
    out as the reference's ``_mini_batches`` stream (``TaskSampler(batches=(steps, size))``).

    The optimizer state runs on across the mini-batches of a task and starts afresh for every task (the reference
    keeps Adam's second moment across all tasks; here each task's solve stays a function of that task alone).
    """

    solver: bl.InnerSolver = None
    size: int = 1

    def __call__(self, inner_loss, params0, hparams, batch):
        images, labels = batch
        params, state, info = params0, None, None
        for i in range(self.steps):
            chunk = (images[i * self.size:(i + 1) * self.size], labels[i * self.size:(i + 1) * self.size])
            params, state, info = self.solver.run(inner_loss, params, hparams, chunk, steps=1, state=state, info=info)
        return params, info
