"""MAML on Omniglot with learn2learn's task sets and its OmniglotCNN, differentiated by bilevel.

    bash tools/install_learn2learn.sh                       # once: learn2learn 0.2.0 without touching torch
    python examples/learn2learn_omniglot.py                 # 5-way 1-shot, 300 meta-steps (minutes on a CPU)
    python examples/learn2learn_omniglot.py --steps 2000 --ways 20

The characters come from the project's Omniglot loader (MAML split: 1,100 train / 100 val / 423 test characters,
28x28, no rotation augmentation) and become learn2learn ``MetaDataset`` / ``Taskset`` objects over a
``TensorDataset``; from there on the code is what a learn2learn user writes, with ``bl.meta_grad`` in place of
``l2l.algorithms.MAML``'s clone / adapt / backward. Prints the test accuracy of the initial and the meta-trained
network on the same test tasks (95% confidence intervals).
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import bilevel as bl  # noqa: E402
from bilevel.interop import learn2learn as bl_l2l  # noqa: E402
from tasks.omniglot.data import load_omniglot  # noqa: E402
from tasks.omniglot.splits import make_split  # noqa: E402


def tasksets(l2l, ways: int, shots: int, seed: int):
    """learn2learn task sets over the train and test characters (labels: one per character)."""
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    data = load_omniglot()
    split = make_split(data, "maml", seed=1)
    out = {}
    for name in ("train", "test"):
        rows = split[name]
        images = data.images[rows].float().div(255.0).reshape(-1, 1, 28, 28)
        labels = torch.arange(len(rows)).repeat_interleave(data.images.shape[1])
        meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
        out[name] = l2l.data.Taskset(meta, task_transforms=[NWays(meta, ways), KShots(meta, 2 * shots),
                                                            LoadData(meta), RemapLabels(meta)])
    random.seed(seed)  # learn2learn samples with the global `random` module
    return out


def accuracy(call, problem, hparams, batches):
    """Mean query accuracy after adapting from ``hparams`` with ``problem.solver``, and its 95% interval."""
    accs = []
    for (xs, ys), (xq, yq) in batches:
        for i in range(xs.shape[0]):
            params, _ = problem.solver(problem.inner_loss, dict(hparams), hparams, (xs[i], ys[i]))
            with torch.no_grad():
                accs.append(float((call(params, xq[i]).argmax(-1) == yq[i]).float().mean()))
    acc = torch.tensor(accs)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(len(accs)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300, help="meta-steps")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch")
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument("--out", default="runs/learn2learn/omniglot.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    start, cpu = time.time(), time.process_time()

    l2l = bl_l2l.load()
    sets = tasksets(l2l, args.ways, args.shots, seed=0)
    model = l2l.vision.models.OmniglotCNN(output_size=args.ways)
    loss, call = bl_l2l.module_loss(model), bl_l2l.module_call(model)
    train = bl.Problem(loss, loss, bl.GradientDescent(lr=0.4, steps=1), init=bl.meta_init)   # MAML: 1 step
    test = bl.Problem(loss, loss, bl.GradientDescent(lr=0.4, steps=3), init=bl.meta_init)    # 3 steps at test
    hparams = bl_l2l.meta_params(model)
    test_batches = list(bl_l2l.meta_batches(sets["test"], 20, args.ways, args.shots,
                                            num_batches=args.test_tasks // 20))
    before = accuracy(call, test, hparams, test_batches)

    opt = torch.optim.Adam(hparams.values(), lr=3e-3)
    for step, (inner, outer) in enumerate(bl_l2l.meta_batches(sets["train"], args.tasks, args.ways, args.shots,
                                                              num_batches=args.steps)):
        out = bl.meta_grad(bl.Unrolled(), train, hparams, inner, outer)
        for name, value in hparams.items():
            value.grad = out.grad[name]
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: query loss {float(out.outer_loss):.3f}", flush=True)
    after = accuracy(call, test, hparams, test_batches)

    results = {"ways": args.ways, "shots": args.shots, "meta_steps": args.steps, "tasks_per_batch": args.tasks,
               "test_tasks": len(test_batches) * 20, "test_acc_before": before, "test_acc_after": after,
               "minutes": (time.time() - start) / 60, "cpu_minutes": (time.process_time() - cpu) / 60,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{args.ways}-way {args.shots}-shot test accuracy: {100 * before[0]:.1f} +- {100 * before[1]:.1f}% "
          f"before, {100 * after[0]:.1f} +- {100 * after[1]:.1f}% after {args.steps} meta-steps "
          f"({results['cpu_minutes']:.1f} CPU min) -> {args.out}")
    return results


if __name__ == "__main__":
    main()
