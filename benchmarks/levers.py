"""Performance levers for the MAML meta-step on the Omniglot conv4 network, each against the same baseline.

    python -m benchmarks.levers --repeats 3 --threads 1
    python -m benchmarks.levers --levers baseline bf16 threads --threads 2

The baseline is ``bl.meta_grad(bl.Unrolled(), ...)`` with loop batching (second-order MAML, 1 inner step, 32 tasks
of 5-way 1-shot with 15 queries), ``tasks.omniglot.model.Conv4`` as it is. Each lever changes one thing:

- ``pool_first``: max-pool before the ReLU (the same function, as ReLU is monotone: ReLU then works on a quarter
  of the pixels, and the pooling no longer follows a ReLU output full of ties);
- ``bf16``: the losses under ``torch.autocast("cpu", torch.bfloat16)`` (convolutions and matmuls in bfloat16,
  batch norm, softmax and the parameters in float32);
- ``bf16_pool_first``: both;
- ``channels_last``: NHWC input and filters;
- ``threads``: the tasks split between two Python threads with one intra-op thread each (task parallelism)
  instead of two intra-op threads on every operation;
- ``compile``: ``torch.compile`` of the per-task meta-gradient function (``compile_bf16_pool_first``: with the two
  levers above);
- ``first_step``: the support-set gradients of all tasks in one ``vmap`` sharing θ (all tasks start from the
  same weights), against one task at a time: only the support part, which is all that this lever can change.

Variants are timed round-robin (one meta-step of each per round) so that a change of machine load hits all of them
alike. Each reports the median wall and process CPU time over ``--repeats`` rounds after one warm-up, and the
cosine and relative distance of its meta-gradient to the baseline's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import bilevel as bl
from benchmarks.workload import INNER_LR, Config, make_data, make_model
from tasks.omniglot.model import Conv4, cross_entropy_loss

ROOT = Path(__file__).resolve().parents[1]
LEVERS = ("baseline", "pool_first", "bf16", "bf16_pool_first", "channels_last", "threads", "compile",
          "compile_bf16_pool_first", "first_step")


class Conv4PoolFirst(Conv4):
    """``Conv4`` with the max-pool moved before the ReLU: ``pool(relu(x)) = relu(pool(x))``."""

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.batch_norm(conv(x), None, None, norm.weight, norm.bias, training=True, eps=1e-5)
            x = F.relu(F.max_pool2d(x, 2))
        return self.head(x.flatten(1))


def autocast_loss(loss, dtype=torch.bfloat16):
    """``loss`` evaluated under CPU autocast; the scalar comes back in float32."""

    def wrapped(params, hparams, batch):
        with torch.autocast("cpu", dtype=dtype):
            return loss(params, hparams, batch).float()

    return wrapped


def make_lever(name: str, cfg: Config):
    """``(step, description)``: ``step()`` returns the meta-gradient (a dict like the parameters)."""
    data = make_data(cfg)
    (xs, ys), (xq, yq) = data
    model = make_model(cfg)
    if name.endswith("pool_first"):
        pooled = Conv4PoolFirst(cfg.ways)
        pooled.load_state_dict(model.state_dict())
        model = pooled
    hparams = model.init_params()
    loss = cross_entropy_loss(model)
    if "bf16" in name:
        loss = autocast_loss(loss)
    problem = bl.Problem(loss, loss, bl.GradientDescent(lr=INNER_LR, steps=cfg.steps), init=bl.meta_init)
    method = bl.Unrolled()

    def meta_grad(h, inner, outer):
        return bl.meta_grad(method, problem, h, inner, outer, params0=None, batching="loop",
                            on_nonconvergence="ignore").grad

    if name == "channels_last":
        cl = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        hparams = {k: cl(v) for k, v in hparams.items()}
        xs, xq = torch.stack([cl(x) for x in xs]), torch.stack([cl(x) for x in xq])  # task slices stay NHWC
        return lambda: meta_grad(hparams, (xs, ys), (xq, yq))

    if name == "threads":
        import copy

        half = cfg.tasks // 2
        parts = [((xs[:half], ys[:half]), (xq[:half], yq[:half])), ((xs[half:], ys[half:]), (xq[half:], yq[half:]))]
        # functional_call swaps a module's parameters in place for the duration of a call, so two threads need
        # two modules.
        problems = [problem, bl.Problem(*(2 * [cross_entropy_loss(copy.deepcopy(model))]), problem.solver,
                                        init=bl.meta_init)]

        def step():
            results = [None, None]

            def work(j):
                results[j] = bl.meta_grad(method, problems[j], hparams, *parts[j], batching="loop",
                                          on_nonconvergence="ignore").grad

            threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
            previous = torch.get_num_threads()
            torch.set_num_threads(1)  # one intra-op thread per task thread
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                torch.set_num_threads(previous)
            return {k: (results[0][k] * half + results[1][k] * (cfg.tasks - half)) / cfg.tasks for k in hparams}

        return step

    if name.startswith("compile"):
        def per_task(h, inner, outer):
            return method(problem, h, inner, outer, None).grad

        compiled = torch.compile(per_task, dynamic=False)

        def step():
            outs = [compiled(hparams, (xs[i], ys[i]), (xq[i], yq[i])) for i in range(cfg.tasks)]
            return {k: torch.stack([o[k] for o in outs]).mean(0) for k in hparams}

        return step

    if name == "first_step":
        support_grad = grad(loss)
        batched = vmap(support_grad, in_dims=(None, None, 0))

        def step():
            return {k: v.mean(0) for k, v in batched(hparams, {}, (xs, ys)).items()}

        return step

    return lambda: meta_grad(hparams, (xs, ys), (xq, yq))


def support_loop_step(cfg: Config):
    """The support-set gradients one task at a time: the reference of the ``first_step`` lever."""
    (xs, ys), _ = make_data(cfg)
    model = make_model(cfg)
    hparams = model.init_params()
    support_grad = grad(cross_entropy_loss(model))

    def step():
        outs = [support_grad(hparams, {}, (xs[i], ys[i])) for i in range(cfg.tasks)]
        return {k: torch.stack([o[k] for o in outs]).mean(0) for k in hparams}

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the threads lever uses 2 tasks "
                                                                "threads x 1 whatever this is)")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "levers.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(tasks=args.tasks, steps=args.steps)

    steps, times, cpu, grads, setup = {}, {}, {}, {}, {}
    names = list(dict.fromkeys(["baseline"] + args.levers))
    if "first_step" in names:
        names.insert(names.index("first_step"), "support_loop")
    for name in names:
        steps[name] = support_loop_step(cfg) if name == "support_loop" else make_lever(name, cfg)
        start = time.perf_counter()
        try:
            grads[name] = steps[name]()  # warm-up (and compilation)
        except Exception as err:  # noqa: BLE001 (a lever that does not apply here is reported, not fatal)
            print(f"{name}: failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
            steps.pop(name)
            continue
        setup[name] = time.perf_counter() - start
        times[name], cpu[name] = [], []
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)

    flat = lambda g: torch.cat([v.detach().float().flatten() for v in g.values()])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"MAML {args.steps}-step meta-step, {args.tasks} tasks, {args.threads} intra-op thread(s), median of "
          f"{args.repeats} (load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}), {date}")
    print("| lever | wall s | CPU s | wall vs baseline | first call s | cosine to baseline | relative distance |")
    print("|---|---|---|---|---|---|---|")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in steps:
        ref = "support_loop" if name == "first_step" else "baseline"
        a, b = flat(grads[name]), flat(grads[ref])
        row = {"lever": name, "reference": ref, "wall_s": statistics.median(times[name]),
               "cpu_s": statistics.median(cpu[name]), "first_call_s": setup[name],
               "cosine": F.cosine_similarity(a, b, 0).item(), "relative_distance": ((a - b).norm() / b.norm()).item()}
        speed = statistics.median(times[ref]) / row["wall_s"]
        print(f"| {name} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {speed:.2f}x | {row['first_call_s']:.1f} "
              f"| {row['cosine']:.5f} | {row['relative_distance']:.2e} |", flush=True)
        row.update(times=times[name], cpu_times=cpu[name], threads=args.threads, tasks=args.tasks, steps=args.steps,
                   load_before=load_before, load_after=os.getloadavg(), date=date, torch=torch.__version__)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
