"""A zoo of bilevel problems with known answers, shared by the core tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bilevel as bl

f64 = torch.float64


# --- ridge regression: closed-form inner solution and hypergradient --------------------------------------------
def ridge_data(n=40, d=5, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, d, generator=g, dtype=dtype)
    w_true = torch.randn(d, generator=g, dtype=dtype)
    y = X @ w_true + 0.5 * torch.randn(2 * n, generator=g, dtype=dtype)
    return (X[:n], y[:n]), (X[n:], y[n:])


def ridge_inner(params, hparams, batch):
    X, y = batch
    return 0.5 * ((X @ params["w"] - y) ** 2).mean() + 0.5 * (hparams["log_l2"].exp() * params["w"] ** 2).sum()


def ridge_outer(params, hparams, batch):
    X, y = batch
    return 0.5 * ((X @ params["w"] - y) ** 2).mean()


def ridge_exact(hparams, train, val):
    """w*(λ) = (XᵀX/n + diag(α))⁻¹ Xᵀy/n with α = exp(log_l2); d L_val/d log_l2 = −α ⊙ w* ⊙ (A⁻¹ ∇L_val)."""
    (X, y), (Xv, yv) = train, val
    alpha = hparams["log_l2"].exp() * torch.ones(X.shape[1], dtype=X.dtype)
    A = X.T @ X / X.shape[0] + torch.diag(alpha)
    w = torch.linalg.solve(A, X.T @ y / X.shape[0])
    g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    d = -alpha * w * torch.linalg.solve(A, g)
    return w, d.sum().reshape(hparams["log_l2"].shape) if hparams["log_l2"].dim() == 0 else d


def ridge_problem(steps=400, tol=1e-12, lr=0.5, solver=None):
    solver = solver or bl.GradientDescent(lr=lr, steps=steps, tol=tol)
    return bl.Problem(ridge_inner, ridge_outer, solver)


# --- L2-regularised logistic regression ------------------------------------------------------------------------
def logreg_data(n=60, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, d, generator=g, dtype=f64)
    y = (X @ torch.randn(d, generator=g, dtype=f64) + 0.3 * torch.randn(2 * n, generator=g, dtype=f64) > 0)
    return (X[:n], y[:n].to(f64)), (X[n:], y[n:].to(f64))


def logreg_inner(params, hparams, batch):
    X, y = batch
    logits = X @ params["w"] + params["b"]
    return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * hparams["log_l2"].exp() * (params["w"] ** 2).sum()


def logreg_outer(params, hparams, batch):
    X, y = batch
    return F.binary_cross_entropy_with_logits(X @ params["w"] + params["b"], y)


# --- a tiny few-shot network (MLP, optionally with training-mode batch norm) -----------------------------------
def mlp_params(d_in=6, hidden=8, n_out=3, seed=0, dtype=f64, batch_norm=False):
    g = torch.Generator().manual_seed(seed)
    p = {"w1": torch.randn(hidden, d_in, generator=g, dtype=dtype) / d_in ** 0.5,
         "b1": torch.zeros(hidden, dtype=dtype),
         "w2": torch.randn(n_out, hidden, generator=g, dtype=dtype) / hidden ** 0.5,
         "b2": torch.zeros(n_out, dtype=dtype)}
    if batch_norm:
        p["gamma"] = 1 + 0.1 * torch.randn(hidden, generator=g, dtype=dtype)
        p["beta"] = 0.1 * torch.randn(hidden, generator=g, dtype=dtype)
    return p


def mlp_forward(params, x):
    h = x @ params["w1"].T + params["b1"]
    if "gamma" in params:  # transductive batch norm: batch statistics, no running statistics (MAML reference)
        h = F.batch_norm(h, None, None, params["gamma"], params["beta"], training=True)
    return torch.tanh(h) @ params["w2"].T + params["b2"]


def task_loss(params, hparams, batch):
    x, y = batch
    return F.cross_entropy(mlp_forward(params, x), y)


def fewshot_tasks(num_tasks=4, n_support=6, n_query=9, d_in=6, n_out=3, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, n_support, d_in, generator=g, dtype=dtype)
    ys = torch.randint(0, n_out, (num_tasks, n_support), generator=g)
    xq = torch.randn(num_tasks, n_query, d_in, generator=g, dtype=dtype)
    yq = torch.randint(0, n_out, (num_tasks, n_query), generator=g)
    return (xs, ys), (xq, yq)


def maml_problem(lr=0.3, steps=3, solver=None):
    return bl.Problem(task_loss, task_loss, solver or bl.GradientDescent(lr=lr, steps=steps), init=bl.meta_init)


def maml_reference(theta, support, query, lr, steps, first_order=False):
    """MAML's meta-gradient by plain torch.autograd through explicit inner steps (Finn et al.'s code shape)."""
    theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    w = dict(theta)
    for _ in range(steps):
        loss = task_loss(w, {}, support)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=not first_order)
        w = {k: v - lr * g for (k, v), g in zip(w.items(), grads)}
    outer = task_loss(w, {}, query)
    wrt = list(w.values()) if first_order else list(theta.values())
    return dict(zip(theta, torch.autograd.grad(outer, wrt)))
