"""Memory of a Neural ODE's backward pass against the number of solver steps: the adjoint against backprop.

    python benchmarks/ode_memory.py
    python benchmarks/ode_memory.py --steps 10 20 40 80 160 320 --batch 256

An MLP field ``dh/dt = MLP(h)`` (``dim``-``hidden``-``dim``, tanh) on a batch of states is integrated over
``t ∈ [0, 1]`` by fixed-step RK4 with each number of steps, forward and backward, by ``odeint(adjoint=True)`` and
``odeint(adjoint=False)``. Memory is what autograd keeps for the backward pass: the bytes of every tensor saved
for backward (``torch.autograd.graph.saved_tensors_hooks``, counted once per storage), the quantity that grows
with the steps when backpropagating through the solver and is flat with the adjoint (which keeps the outputs and
the weights only). Also reported: CPU seconds of forward + backward (``time.process_time``, the two methods
interleaved in one process) and the largest difference of their gradients, which shrinks with the step as RK4's
``O(h⁴)``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.func import functional_call

from bilevel.layers import odeint
from bilevel.testing import saved_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.dim))
    params = {k: v.detach().requires_grad_() for k, v in field.named_parameters()}
    h0 = torch.randn(args.batch, args.dim)
    t = torch.tensor([0.0, 1.0])

    def f(s, h, p):
        return functional_call(field, p, (h,))

    for adjoint in (True, False):  # warm-up: first-call costs out of the timings
        torch.autograd.grad(odeint(f, h0, t, params, method="rk4", adjoint=adjoint)[-1].sum(), list(params.values()))
    rows = []
    for steps in args.steps:
        row = dict(steps=steps)
        grads = {}
        for adjoint in (True, False):
            name = "adjoint" if adjoint else "backprop"
            t0 = time.process_time()
            ys, nbytes = saved_bytes(lambda: odeint(f, h0, t, params, method="rk4", step_size=1.0 / steps,
                                                    adjoint=adjoint))
            grads[name] = torch.autograd.grad(ys[-1].square().mean(), list(params.values()))
            row[f"{name}_saved_mb"] = nbytes / 2 ** 20
            row[f"{name}_cpu_s"] = time.process_time() - t0
        row["grad_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads["adjoint"], grads["backprop"]))
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(args=vars(args), rows=rows), fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
