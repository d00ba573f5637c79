"""Accuracy of a meta-trained Omniglot checkpoint when queries are classified in a batch or one at a time.

Batch norm in conv4 is transductive (batch statistics, no running statistics), so a prediction depends on the
batch it is made in. This measures, on meta-test tasks of the checkpoint's own protocol, three ways to classify
the query set after adapting to the support set with :class:`tasks.omniglot.inference.FewShotClassifier`:

- ``batch``: all queries of the task together (``transductive=True``), as in the meta-test;
- ``one at a time``: each query alone under transductive batch norm (its own statistics; ``predict`` refuses
  this, so the forward pass is called directly);
- ``with support``: each query normalised together with the support set (``transductive=False``).

Usage::

    python -m benchmarks.omniglot_single_query runs/omniglot/fomaml_5w1s/checkpoint.pt --tasks 200 [--ways 20]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from tasks.omniglot import train
from tasks.omniglot.config import OmniglotConfig
from tasks.omniglot.inference import FewShotClassifier
from tasks.omniglot.run_folder import load_checkpoint


def _summary(hits: list[float]) -> str:
    acc = torch.tensor(hits, dtype=torch.float64)
    ci = 1.96 * acc.std(unbiased=True).item() / math.sqrt(len(acc))
    return f"{100 * acc.mean().item():6.2f} +- {100 * ci:.2f} %"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tasks", type=int, default=200, help="meta-test tasks (default 200)")
    parser.add_argument("--ways", type=int, default=None, help="N of the test tasks (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    state = load_checkpoint(args.checkpoint)
    cfg = OmegaConf.merge(OmegaConf.structured(OmniglotConfig), state["config"])
    if args.ways:   # other N: FewShotClassifier starts every head row from the mean meta-learned row
        cfg.task.ways = args.ways
    work = train.build(cfg)
    clf = FewShotClassifier.load(args.checkpoint)
    hits = {"batch": [], "one at a time": [], "with support": []}
    cpu = time.process_time()
    batch = work.samplers["test"].sample(0, args.tasks)
    for i in range(args.tasks):
        task = batch.task(i)
        adapted = clf.adapt(task.support, task.support_labels.tolist())
        truth = task.query_labels.tolist()
        predictions = {
            "batch": adapted.predict(task.query),
            "with support": adapted.predict(task.query, transductive=False),
        }
        with torch.no_grad():   # what predict() refuses: each query normalised by its own statistics
            alone = [functional_call(adapted.model, adapted.params, (task.query[j:j + 1],)).argmax(-1).item()
                     for j in range(len(truth))]
        predictions["one at a time"] = [adapted.classes[i] for i in alone]
        for name, predicted in predictions.items():
            hits[name].append(sum(p == t for p, t in zip(predicted, truth)) / len(truth))
    cpu = time.process_time() - cpu
    t = cfg.task
    print(f"{args.checkpoint} (step {state['step']}): {t.ways}-way {t.shots}-shot, "
          f"{task.query.shape[0]} queries per task, {args.tasks} meta-test tasks, "
          f"{clf.solver.steps} inner steps; {cpu / 60:.1f} CPU min")
    for name, values in hits.items():
        print(f"  {name:14s} {_summary(values)}")
    return {name: sum(v) / len(v) for name, v in hits.items()}


if __name__ == "__main__":
    main()
