"""Quick start: the hypergradient of a validation loss w.r.t. ridge weight decay, four ways, against the closed form.

    python examples/quickstart.py

Data: scikit-learn's bundled diabetes set (no download). Runs in a few seconds on a CPU.
"""

import torch
from sklearn.datasets import load_diabetes

import bilevel as bl

torch.set_default_dtype(torch.float64)
X, y = (torch.tensor(a) for a in load_diabetes(return_X_y=True))
X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
train, val = (X[:300], y[:300]), (X[300:], y[300:])

mse = lambda w, batch: 0.5 * ((batch[0] @ w["w"] - batch[1]) ** 2).mean()
wd = lambda params, hparams: 0.5 * hparams["log_wd"].exp() * (params["w"] ** 2).sum()
inner_loss = lambda params, hparams, batch: mse(params, batch) + wd(params, hparams)
outer_loss = lambda params, hparams, batch: mse(params, batch)
problem = bl.Problem(inner_loss, outer_loss, bl.GradientDescent(lr=0.4, steps=600, tol=1e-10))
hparams, params0 = {"log_wd": torch.tensor(-2.0)}, {"w": torch.zeros(X.shape[1])}

# closed form: w* = (XᵀX/n + α I)⁻¹ Xᵀy/n, d L_val / d log α = −α w*ᵀ (XᵀX/n + α I)⁻¹ ∇L_val(w*)
alpha, (Xt, yt), (Xv, yv) = hparams["log_wd"].exp(), train, val
A = Xt.T @ Xt / len(yt) + alpha * torch.eye(X.shape[1])
w_star = torch.linalg.solve(A, Xt.T @ yt / len(yt))
exact = -alpha * w_star @ torch.linalg.solve(A, Xv.T @ (Xv @ w_star - yv) / len(yv))

for method in (bl.Implicit(bl.CG(steps=20)), bl.neumann(steps=300, alpha=0.4), bl.Unrolled(), bl.Forward()):
    out = bl.hypergrad(method, problem, hparams, train, val, params0)
    name = f"{type(method).__name__}({getattr(method, 'linear_solver', '')!r})".replace("('')", "()")
    print(f"{name:52s} d val/d log_wd = {out.grad['log_wd']:+.10f} (exact {exact:+.10f})")
