"""The benchmark workload: one meta-step on the Omniglot conv4 network, by bilevel and by the peer libraries.

Every implementation computes the same thing on the same weights and data: the meta-gradient of the mean query
loss over a meta-batch of 5-way 1-shot tasks (15 queries per class, 32 tasks) with respect to the meta-initialisation
θ of ``tasks.omniglot.model.Conv4`` (3x3 convs, transductive batch norm; by default the MAML reference's Omniglot
network with stride-2 convs, ``Config.pool="max"`` the 2x2 max-pool variant; 28x28 inputs). Inputs are random
28x28 images: the cost of a meta-step does not depend on pixel values.

``make_step(cfg)`` returns a zero-argument function running one meta-step; ``benchmarks/measure.py`` times it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
from tasks.omniglot.model import Conv4, cross_entropy_loss

INNER_LR = 0.4   # MAML's Omniglot inner step size
REG = 2.0        # iMAML's proximal strength λ (Rajeswaran et al., Omniglot)


@dataclass
class Config:
    """One benchmark configuration.

    impl: ``bilevel`` or a peer (``autograd``, ``higher``, ``learn2learn``, ``torchopt``, ``torchopt_implicit``).
    method: bilevel method (``unrolled``, ``first_order``, ``reptile``, ``imaml``, ``neumann``, ``jfb``);
        ``unrolled`` or ``first_order`` for ``autograd`` and ``learn2learn``; for ``torchopt_implicit`` the linear
        solver (``cg`` or ``normal_cg``).
    steps: inner gradient steps.
    batching, chunk_size, workers: bilevel's task batching (``loop`` | ``vmap`` | ``threads``; vmap ``chunk_size``;
        ``workers`` threads).
    pool: the conv4 variant (``stride`` or ``max``, see ``tasks.omniglot.model``).
    """

    impl: str = "bilevel"
    method: str = "unrolled"
    steps: int = 1
    batching: str = "loop"
    chunk_size: int | None = None
    workers: int | None = None
    pool: str = "stride"
    tasks: int = 32
    ways: int = 5
    shots: int = 1
    queries: int = 15
    cg_steps: int = 5
    seed: int = 0

    def key(self) -> str:
        chunk = "" if self.chunk_size is None else f"/chunk{self.chunk_size}"
        chunk += "" if self.workers is None else f"/workers{self.workers}"
        batching = f"{self.batching}{chunk}" if self.impl == "bilevel" else "loop"
        return f"{self.impl}:{self.method}:steps{self.steps}:{batching}:T{self.tasks}"


def make_data(cfg: Config):
    """Random support and query sets with a leading task dimension: ``((xs, ys), (xq, yq))``."""
    g = torch.Generator().manual_seed(cfg.seed)
    n_s, n_q = cfg.ways * cfg.shots, cfg.ways * cfg.queries
    xs = torch.rand(cfg.tasks, n_s, 1, 28, 28, generator=g)
    xq = torch.rand(cfg.tasks, n_q, 1, 28, 28, generator=g)
    ys = torch.arange(cfg.ways).repeat_interleave(cfg.shots).expand(cfg.tasks, n_s).contiguous()
    yq = torch.arange(cfg.ways).repeat_interleave(cfg.queries).expand(cfg.tasks, n_q).contiguous()
    return (xs, ys), (xq, yq)


def make_model(cfg: Config) -> Conv4:
    torch.manual_seed(cfg.seed)
    return Conv4(cfg.ways, pool=cfg.pool)


def bilevel_method(cfg: Config):
    """The bilevel method object and whether its inner loss is iMAML's proximal one."""
    if cfg.method == "unrolled":
        return bl.Unrolled(), False
    if cfg.method == "first_order":
        return bl.FirstOrder(), False
    if cfg.method == "reptile":
        return bl.Reptile(), False
    if cfg.method == "imaml":
        return bl.imaml(reg=REG, cg_steps=cfg.cg_steps), True
    if cfg.method == "neumann":
        # As many Hessian-vector products as CG-5; α = 1/(λ + 8) keeps α below 2/L for this network.
        return bl.neumann(steps=cfg.cg_steps, alpha=1.0 / (REG + 8.0)), True
    if cfg.method == "jfb":
        # A ≈ (1/λ)⁻¹ I for the proximal condition: the hypergradient becomes the first-order one, scaled.
        return bl.jfb(alpha=1.0 / REG), True
    raise ValueError(f"unknown bilevel method {cfg.method!r}")


def make_bilevel_step(cfg: Config, model: Conv4, data) -> Callable[[], dict]:
    method, proximal = bilevel_method(cfg)
    task_loss = cross_entropy_loss(model)
    inner_loss = bl.proximal(task_loss, REG) if proximal else task_loss
    problem = bl.Problem(inner_loss, task_loss, bl.GradientDescent(lr=INNER_LR, steps=cfg.steps),
                         init=bl.meta_init)
    hparams = model.init_params()
    (xs, ys), (xq, yq) = data

    def step():
        out = bl.meta_grad(method, problem, hparams, (xs, ys), (xq, yq), batching=cfg.batching,
                           chunk_size=cfg.chunk_size, workers=cfg.workers, on_nonconvergence="ignore",
                           on_nonfinite="raise")
        return out.grad

    return step


def _ce(logits, labels):
    return F.cross_entropy(logits, labels)


def make_autograd_step(cfg: Config, model: Conv4, data) -> Callable[[], dict]:
    """The plain reference: torch.autograd through explicit inner steps, one task after another (first order:
    the inner gradients are constants)."""
    (xs, ys), (xq, yq) = data
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def step():
        for v in theta.values():
            v.grad = None
        for i in range(cfg.tasks):
            w = theta
            for _ in range(cfg.steps):
                loss = _ce(functional_call(model, w, (xs[i],)), ys[i])
                grads = torch.autograd.grad(loss, list(w.values()), create_graph=cfg.method != "first_order")
                w = {k: v - INNER_LR * g for (k, v), g in zip(w.items(), grads)}
            (_ce(functional_call(model, w, (xq[i],)), yq[i]) / cfg.tasks).backward()
        return {k: v.grad for k, v in theta.items()}

    return step


def make_higher_step(cfg: Config, model: Conv4, data) -> Callable[[], dict]:
    import higher

    (xs, ys), (xq, yq) = data
    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)

    def step():
        model.zero_grad(set_to_none=True)
        for i in range(cfg.tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(cfg.steps):
                    diffopt.step(_ce(fmodel(xs[i]), ys[i]))
                (_ce(fmodel(xq[i]), yq[i]) / cfg.tasks).backward()
        return {k: v.grad for k, v in model.named_parameters()}

    return step


def load_learn2learn_maml():
    """``learn2learn.algorithms.MAML``, through ``bilevel.interop.learn2learn.load`` (which works without gym and
    torchvision)."""
    from bilevel.interop import learn2learn as bl_l2l

    return bl_l2l.load().algorithms.MAML


def learn2learn_meta_grad(maml, data, tasks: int, steps: int) -> dict:
    """The meta-gradient of ``l2l.algorithms.MAML`` as learn2learn's examples compute it: per task ``clone()``,
    ``steps`` ``adapt()`` calls on the support loss, ``backward()`` of the query loss over ``tasks``."""
    (xs, ys), (xq, yq) = data
    maml.zero_grad(set_to_none=True)
    for i in range(tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(_ce(learner(xs[i]), ys[i]))
        (_ce(learner(xq[i]), yq[i]) / tasks).backward()
    return {k: v.grad for k, v in maml.module.named_parameters()}


def make_learn2learn_step(cfg: Config, model: Conv4, data) -> Callable[[], dict]:
    maml = load_learn2learn_maml()(model, lr=INNER_LR, first_order=cfg.method == "first_order")
    return lambda: learn2learn_meta_grad(maml, data, cfg.tasks, cfg.steps)


def make_torchopt_step(cfg: Config, model: Conv4, data) -> Callable[[], dict]:
    """TorchOpt's MAML recipe (its examples/MAML-omniglot): ``MetaSGD`` steps, then restore the weights."""
    import torchopt

    (xs, ys), (xq, yq) = data
    inner_opt = torchopt.MetaSGD(model, lr=INNER_LR)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt)

    def step():
        model.zero_grad(set_to_none=True)
        for i in range(cfg.tasks):
            for _ in range(cfg.steps):
                inner_opt.step(_ce(model(xs[i]), ys[i]))
            (_ce(model(xq[i]), yq[i]) / cfg.tasks).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return {k: v.grad for k, v in model.named_parameters()}

    return step


def make_torchopt_implicit_step(cfg: Config, model: Conv4, data) -> Callable[[], dict]:
    """TorchOpt's iMAML recipe (its examples/iMAML): ``custom_root`` on the proximal stationarity condition.

    ``cfg.method`` picks the adjoint solver: ``cg`` (the same algorithm as bilevel's ``imaml``) or ``normal_cg``
    (the one TorchOpt's example uses), both with ``cfg.cg_steps`` iterations.
    """
    import torchopt

    (xs, ys), (xq, yq) = data
    names = [k for k, _ in model.named_parameters()]
    meta_params = tuple(v.detach().clone().requires_grad_() for _, v in model.named_parameters())

    def objective(params, meta, batch):
        x, y = batch
        loss = _ce(functional_call(model, dict(zip(names, params)), (x,)), y)
        pull = sum(((p - m) ** 2).sum() for p, m in zip(params, meta))
        return loss + 0.5 * REG * pull

    solvers = {"cg": torchopt.linear_solve.solve_cg, "normal_cg": torchopt.linear_solve.solve_normal_cg}
    solve = solvers[cfg.method](maxiter=cfg.cg_steps, atol=0)

    @torchopt.diff.implicit.custom_root(torch.func.grad(objective, argnums=0), argnums=1, solve=solve)
    def inner_solver(params, meta, batch):
        with torch.enable_grad():
            for _ in range(cfg.steps):
                grads = torch.autograd.grad(objective(params, meta, batch), params)
                params = tuple(p - INNER_LR * g for p, g in zip(params, grads))
        return params

    def step():
        for v in meta_params:
            v.grad = None
        for i in range(cfg.tasks):
            start = tuple(m.detach().clone().requires_grad_() for m in meta_params)
            params = inner_solver(start, meta_params, (xs[i], ys[i]))
            (_ce(functional_call(model, dict(zip(names, params)), (xq[i],)), yq[i]) / cfg.tasks).backward()
        return {k: v.grad for k, v in zip(names, meta_params)}

    return step


BUILDERS = {
    "bilevel": make_bilevel_step,
    "autograd": make_autograd_step,
    "higher": make_higher_step,
    "learn2learn": make_learn2learn_step,
    "torchopt": make_torchopt_step,
    "torchopt_implicit": make_torchopt_implicit_step,
}


def make_step(cfg: Config) -> Callable[[], dict]:
    """A zero-argument function running one meta-step of ``cfg`` and returning the meta-gradient dict."""
    if cfg.impl not in BUILDERS:
        raise ValueError(f"unknown impl {cfg.impl!r}; choose from {sorted(BUILDERS)}")
    model = make_model(cfg)
    return BUILDERS[cfg.impl](cfg, model, make_data(cfg))
