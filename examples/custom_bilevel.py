"""Data hyper-cleaning on MNIST (Franceschi et al. 2017, https://arxiv.org/abs/1703.01785): a custom bilevel problem
written with nothing but the public API.

    python examples/custom_bilevel.py
    python examples/custom_bilevel.py methods=[implicit] outer_steps=50 corruption=0.3

A training set whose labels are wrong for a fraction ``corruption`` of the examples, one learned weight per training
example, and a clean validation set:

    λ* = argmin_λ  L_val(w*(λ))                                  (outer: clean validation cross-entropy)
    w*(λ) = argmin_w  1/N Σ_i σ(λ_i) ℓ(w; x_i, y_i) + reg/2 ||w||²   (inner: weighted softmax regression)

The hyperparameters are the N logits λ_i (σ = sigmoid); the inner problem is strongly convex, so the implicit
function theorem applies with CG on its Hessian. Each outer step warm-starts the inner solve from the previous
solution and runs ``inner_steps`` of Nesterov gradient descent; the hypergradient comes from each method in
``methods`` (``implicit``: CG on the stationarity condition, the gradient of the exact w*(λ); ``unrolled``:
backpropagation through the ``inner_steps`` from the warm start, the gradient of that finite computation;
``neumann``: a truncated Neumann series). ``torch.optim.Adam`` updates λ.

Reported per method: how many corrupted examples end with weight σ(λ_i) < 0.5 (and how many clean ones do), and
the test accuracy of softmax regression retrained with the learned weights, against training on all data and on
the clean examples only (the oracle). Keys (``key=value``; unknown keys are errors): see ``Config``. Writes
``<out_dir>/results.json`` and ``<out_dir>/weights.png``; wandb is offline unless ``wandb_mode=online``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import bilevel as bl  # noqa: E402
from tasks.data import load_idx_dataset  # noqa: E402
from tasks import config  # noqa: E402


@dataclass
class Config:
    methods: list = field(default_factory=lambda: ["implicit", "unrolled"])  # implicit | unrolled | neumann
    n_train: int = 5000  # training examples (the first ones of the MNIST training set)
    n_val: int = 5000  # clean validation examples (the next ones)
    n_test: int = 10000  # MNIST test examples
    corruption: float = 0.5  # fraction of training labels replaced by a wrong label
    reg: float = 1e-3  # L2 on the classifier weights (makes the inner problem strongly convex)
    inner_steps: int = 30  # Nesterov GD steps per outer step (warm-started)
    momentum: float = 0.9
    outer_steps: int = 60
    outer_lr: float = 0.1  # Adam on the logits λ
    cg_steps: int = 20  # implicit: CG on the inner Hessian
    neumann_steps: int = 20
    retrain_steps: int = 1000  # final fit with the learned weights, for the test accuracy
    dtype: str = "float32"  # float32 | float64
    threads: int = 1
    seed: int = 0
    data_root: Optional[str] = None  # default: $BILEVEL_DATA
    out_dir: str = "runs/custom_bilevel"
    wandb_mode: str = "offline"  # offline | online | disabled


def load_data(cfg: Config):
    images, labels = load_idx_dataset("mnist", "train", cfg.data_root)
    test_images, test_labels = load_idx_dataset("mnist", "test", cfg.data_root)
    dtype = getattr(torch, cfg.dtype)
    mean = images[:cfg.n_train].reshape(-1, 784).to(dtype).mean(0) / 255.0
    prep = lambda t: t.reshape(-1, 784).to(dtype) / 255.0 - mean  # noqa: E731  centred pixels condition GD
    train_x, val_x, test_x = prep(images[:cfg.n_train]), prep(images[cfg.n_train:cfg.n_train + cfg.n_val]), \
        prep(test_images[:cfg.n_test])
    train_y, val_y = labels[:cfg.n_train].clone(), labels[cfg.n_train:cfg.n_train + cfg.n_val]
    g = torch.Generator().manual_seed(cfg.seed)
    corrupted = torch.randperm(cfg.n_train, generator=g)[:int(cfg.corruption * cfg.n_train)]
    # a wrong label: shift by 1..9 classes
    train_y[corrupted] = (train_y[corrupted] + torch.randint(1, 10, (len(corrupted),), generator=g)) % 10
    is_corrupted = torch.zeros(cfg.n_train, dtype=torch.bool)
    is_corrupted[corrupted] = True
    return (train_x, train_y), (val_x, val_y), (test_x, test_labels[:cfg.n_test]), is_corrupted


def make_problem(cfg: Config, train_x):
    """The two losses and the inner solver: everything the library needs to know about hyper-cleaning."""

    def inner_loss(params, hparams, batch):
        x, y = batch
        per_example = F.cross_entropy(x @ params["W"] + params["b"], y, reduction="none")
        return (torch.sigmoid(hparams["logit"]) * per_example).mean() + 0.5 * cfg.reg * (params["W"] ** 2).sum()

    def outer_loss(params, hparams, batch):
        x, y = batch
        return F.cross_entropy(x @ params["W"] + params["b"], y)

    # step size 1/L from the curvature bound L = ½ λ_max(XᵀX/N) + reg of the (unit-weight) inner loss
    L = 0.5 * torch.linalg.eigvalsh(train_x.T @ train_x / len(train_x))[-1].item() + cfg.reg
    solver = bl.GradientDescent(lr=1.0 / L, steps=cfg.inner_steps, momentum=cfg.momentum, nesterov=True)
    return bl.Problem(inner_loss, outer_loss, solver), L


def make_method(name: str, cfg: Config, L: float):
    if name == "implicit":
        return bl.Implicit(bl.CG(steps=cfg.cg_steps, tol=1e-4 if cfg.dtype == "float32" else 1e-8))
    if name == "unrolled":
        return bl.Unrolled()
    if name == "neumann":
        return bl.neumann(steps=cfg.neumann_steps, alpha=1.0 / L)
    raise ValueError(f"methods: unknown method {name!r}; expected implicit, unrolled or neumann.")


def fit(problem, weights_logit, train, steps):
    """Softmax regression trained to (near) convergence with fixed example weights."""
    params0 = {"W": train[0].new_zeros(784, 10), "b": train[0].new_zeros(10)}
    solver = bl.GradientDescent(lr=problem.solver.lr, steps=steps, momentum=problem.solver.momentum, nesterov=True)
    params, info = solver(problem.inner_loss, params0, {"logit": weights_logit}, train)
    return params, info


def accuracy(params, data):
    x, y = data
    return (x @ params["W"] + params["b"]).argmax(1).eq(y).float().mean().item()


def run_method(name, cfg, problem, L, train, val, is_corrupted, wandb_run):
    method = make_method(name, cfg, L)
    logit = train[0].new_zeros(cfg.n_train, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=cfg.outer_lr)
    params = {"W": train[0].new_zeros(784, 10), "b": train[0].new_zeros(10)}
    history, t0 = [], time.perf_counter()
    for step in tqdm(range(cfg.outer_steps), desc=name):
        # the residuals are logged below rather than warned about at every step
        out = bl.hypergrad(method, problem, {"logit": logit.detach()}, train, val, params0=params,
                           on_nonconvergence="ignore")
        params = out.params  # warm start of the next inner solve
        opt.zero_grad()
        logit.grad = out.grad["logit"]
        opt.step()
        low = torch.sigmoid(logit.detach()) < 0.5
        row = dict(step=step + 1, val_loss=out.outer_loss.item(), inner_grad_norm=out.inner_info.residual.item(),
                   cg_residual=None if out.linear_info is None else out.linear_info.residual.item(),
                   corrupted_low=int((low & is_corrupted).sum()), clean_low=int((low & ~is_corrupted).sum()))
        history.append(row)
        wandb_run.log({f"{name}/{k}": v for k, v in row.items() if v is not None})
    seconds = time.perf_counter() - t0
    return logit.detach(), history, seconds


def summarize(weights, is_corrupted):
    low = weights < 0.5
    tp, fp = int((low & is_corrupted).sum()), int((low & ~is_corrupted).sum())
    precision, recall = tp / max(tp + fp, 1), tp / int(is_corrupted.sum())
    return dict(corrupted=int(is_corrupted.sum()), corrupted_low_weight=tp, clean_low_weight=fp,
                precision=precision, recall=recall, f1=2 * precision * recall / max(precision + recall, 1e-12))


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val, test, is_corrupted = load_data(cfg)
    problem, L = make_problem(cfg, train[0])
    import wandb
    wandb_run = wandb.init(project="bilevel-hyper-cleaning", config=asdict(cfg), mode=cfg.wandb_mode,
                           dir=str(out_dir))
    big = 30.0  # σ(±30) = 1 or 0 to machine precision: weights for the baselines
    baselines = {"all data": train[0].new_full((cfg.n_train,), big),
                 "clean only (oracle)": torch.where(is_corrupted, -big, big).to(train[0].dtype)}
    results = dict(config=asdict(cfg), inner_lr=1.0 / L, machine=f"{os.cpu_count()}-core CPU, torch "
                   f"{torch.__version__}, {cfg.threads} thread(s)", command=" ".join(sys.argv), baselines={},
                   methods={})
    path = out_dir / "results.json"
    if path.exists():  # resume: keep what an earlier run with the same settings already measured
        previous = json.loads(path.read_text())
        same = lambda c: {k: v for k, v in c.items() if k != "methods"}  # noqa: E731
        if same(previous["config"]) == same(asdict(cfg)):
            results["baselines"] = previous["baselines"]
            results["methods"] = {k: v for k, v in previous["methods"].items()
                                  if k in cfg.methods and (out_dir / f"weights_{k}.pt").exists()}
    for name, logit in baselines.items():
        if name in results["baselines"]:
            continue
        params, info = fit(problem, logit, train, cfg.retrain_steps)
        results["baselines"][name] = dict(test_acc=accuracy(params, test), val_acc=accuracy(params, val),
                                          final_grad_norm=info.residual.item())
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    for name in results["baselines"]:
        print(f"{name:>20}: test accuracy {results['baselines'][name]['test_acc']:.4f}")
    weights = {}
    for name in cfg.methods:
        if name in results["methods"]:
            weights[name] = torch.load(out_dir / f"weights_{name}.pt", weights_only=True)
            continue
        logit, history, seconds = run_method(name, cfg, problem, L, train, val, is_corrupted, wandb_run)
        params, info = fit(problem, logit, train, cfg.retrain_steps)
        weights[name] = torch.sigmoid(logit)
        torch.save(weights[name], out_dir / f"weights_{name}.pt")
        results["methods"][name] = dict(
            **summarize(weights[name], is_corrupted), test_acc=accuracy(params, test), val_acc=accuracy(params, val),
            seconds=seconds, seconds_per_outer_step=seconds / cfg.outer_steps,
            final_val_loss=history[-1]["val_loss"], final_inner_grad_norm=history[-1]["inner_grad_norm"],
            max_cg_residual=max((h["cg_residual"] for h in history if h["cg_residual"] is not None), default=None),
            history=history)
        r = results["methods"][name]
        print(f"{name:>20}: test accuracy {r['test_acc']:.4f}; {r['corrupted_low_weight']}/{r['corrupted']} "
              f"corrupted and {r['clean_low_weight']} clean examples get weight < 0.5 (F1 {r['f1']:.3f}); "
              f"{r['seconds_per_outer_step']:.2f} s per outer step")
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    fig, axes = plt.subplots(1, len(weights), figsize=(4.5 * len(weights), 3.2), squeeze=False)
    for ax, (name, w) in zip(axes[0], weights.items()):
        ax.hist([w[~is_corrupted].numpy(), w[is_corrupted].numpy()], bins=20, range=(0, 1),
                label=["clean", "corrupted"])
        ax.set(title=f"{name}: learned example weights", xlabel="σ(λ_i)", ylabel="examples")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "weights.png", dpi=120)
    wandb_run.finish()
    return results


def main(argv):
    run(config.from_argv(Config, argv, __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
