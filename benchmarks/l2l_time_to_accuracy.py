"""Time to 95 % and 97 % validation accuracy: learn2learn's MAML against bilevel's, on the same tasks and weights.

    BILEVEL_DATA=/path/to/data python -m benchmarks.l2l_time_to_accuracy --max-minutes 170 --threads 1
    BILEVEL_DATA=/path/to/data python -m benchmarks.l2l_time_to_accuracy --max-minutes 170 --threads 1 --resume
    BILEVEL_DATA=/path/to/data python -m benchmarks.l2l_time_to_accuracy --max-minutes 170 --threads 2 \
        --bilevel-batching threads --out runs/benchmarks/l2l_time_to_accuracy_2threads.jsonl
    python -m benchmarks.l2l_time_to_accuracy --report --out runs/benchmarks/l2l_time_to_accuracy_2threads.jsonl

learn2learn's side is the meta-step of its ``examples/vision/maml_omniglot.py``: ``l2l.algorithms.MAML(model,
lr=0.5, first_order=False)``; per task ``clone()``, one ``adapt()`` on the support loss, ``backward()`` of the query
loss (cross-entropy, mean over the batch); the summed gradients scaled by ``1/meta_batch_size``; ``Adam(lr=0.003)``.
bilevel's side is ``bl.meta_grad(bl.Unrolled(), ...)`` with one gradient step of lr 0.5 and the same Adam. Both train
learn2learn's ``OmniglotCNN`` through ``bilevel.interop.learn2learn``, from the same initial weights.

On several cores the two use them differently. learn2learn's side runs with ``--threads`` intra-op threads (as its
example uses a multi-core CPU: torch parallelises each operation). bilevel's side runs its tasks one after another
on the same intra-op threads (``--bilevel-batching loop``), or splits them into ``--bilevel-workers`` (default
``--threads``) contiguous groups, each in a worker thread with one intra-op thread (``--bilevel-batching threads``,
task parallelism). The third line above compares learn2learn on 2 intra-op threads with bilevel on 2 task threads.

Tasks are 5-way 1-shot with 1 query per class (learn2learn's ``train_samples=2*shots``: the even positions adapt,
the odd ones evaluate), every class of a task turned by its own random multiple of 90 degrees (its
``RandomClassRotation``), 32 per meta-batch, drawn by the project's ``TaskSampler`` from the MAML split (1,100 train /
100 validation characters). Each round draws one meta-batch and runs one meta-step of each implementation on it,
in alternating order; only the meta-steps are timed (wall clock and process CPU time), not the sampling or the
validation. Every ``--val-every`` meta-steps both are validated on the same fixed tasks of the validation characters
(adapted with the training step, as the example validates). The experiment ends when both reached every target; a
target not reached is reported as such.

An experiment runs in sessions (invocations). A session ends at the first round boundary after its own
``--max-minutes`` or ``--max-steps``, or after SIGTERM / SIGINT (a second signal stops at once). The checkpoint
``--checkpoint`` (default: ``--out`` with the suffix ``.ckpt.pt``) is written atomically at every validation and at
the end of a session: both sides' weights and Adam states, the round, the clocks, the per-step times, the targets
reached. ``--resume`` continues from it; the tasks of a round depend on the round only, so a resumed experiment
trains on the same tasks, to the same weights, as an uninterrupted one, and its clocks keep adding up. A new
experiment never overwrites a checkpoint, and a checkpoint is not resumed with other experiment-defining options.
The time to a target is given twice: the training time of that side (its meta-steps only), and the wall clock of
the experiment, all sessions with everything in them (loading, sampling, the other side, validation). A session
killed without a signal (SIGKILL, power loss) loses its rounds since the last validation; its resume repeats them,
and their records in ``--out``.

Appends JSON lines to ``--out`` (a ``start`` record or, per resumed session, a ``resume`` record; one ``val`` record
per implementation and validation; one ``result`` record per implementation and session) and prints a Markdown
table. Every record of an experiment carries the ``date`` of its start.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import sys
import os
import signal
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel.interop import learn2learn as bl_l2l
from examples.learn2learn_omniglot import accuracy
from tasks.omniglot.data import load_omniglot
from tasks.run_folder import atomic_write
from tasks.omniglot.sampler import TaskSampler
from tasks.omniglot.splits import make_split
from tasks.omniglot.train import VAL_SEED

ROOT = Path(__file__).resolve().parents[1]
# learn2learn's examples/vision/maml_omniglot.py: main(ways=5, shots=1, meta_lr=0.003, fast_lr=0.5,
# meta_batch_size=32, adaptation_steps=1), MAML(first_order=False).
WAYS, SHOTS, QUERIES, META_BATCH, FAST_LR, META_LR, ADAPTATION_STEPS = 5, 1, 1, 32, 0.5, 0.003, 1
TARGETS = (0.95, 0.97)
GRAD_RTOL = 1e-5   # float32: summation order differs (bilevel's task threads sum per group, then the groups)
CHECKPOINT_FORMAT = 1


class Learn2learnMAML:
    """The meta-step of learn2learn's ``examples/vision/maml_omniglot.py`` (its monitoring left out)."""

    name = "learn2learn"

    def __init__(self, l2l, model: torch.nn.Module):
        self.maml = l2l.algorithms.MAML(model, lr=FAST_LR, first_order=False)
        self.opt = torch.optim.Adam(self.maml.parameters(), META_LR)

    def meta_grad(self, inner, outer) -> dict[str, torch.Tensor]:
        (xs, ys), (xq, yq) = inner, outer
        self.opt.zero_grad()
        for i in range(xs.shape[0]):
            learner = self.maml.clone()
            for _ in range(ADAPTATION_STEPS):
                learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
            F.cross_entropy(learner(xq[i]), yq[i]).backward()
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / xs.shape[0])
        return {name: p.grad for name, p in self.maml.module.named_parameters()}

    def step(self, inner, outer) -> None:
        self.meta_grad(inner, outer)
        self.opt.step()

    def hparams(self) -> dict[str, torch.Tensor]:
        return bl_l2l.meta_params(self.maml.module)

    def state_dict(self) -> dict:
        return {"module": self.maml.module.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.maml.module.load_state_dict(state["module"])   # in place: Adam keeps the same parameters
        self.opt.load_state_dict(state["opt"])


class BilevelMAML:
    """Second-order MAML by ``bl.meta_grad(bl.Unrolled(), ...)`` on the module run by ``bl_l2l.module_loss``."""

    name = "bilevel"

    def __init__(self, model: torch.nn.Module, method=None, batching: str = "loop", workers: int | None = None):
        """``batching``, ``workers``: as ``bl.meta_grad``'s (``workers`` only with ``batching="threads"``)."""
        loss = bl_l2l.module_loss(model)   # thread-safe: a module copy per thread
        self.problem = bl.Problem(loss, loss, bl.GradientDescent(lr=FAST_LR, steps=ADAPTATION_STEPS),
                                  init=bl.meta_init)
        self.method = method or bl.Unrolled()
        self.params = bl_l2l.meta_params(model)   # the hparams θ; Adam updates them in place
        self.opt = torch.optim.Adam(self.params.values(), META_LR)
        self.batching, self.workers = batching, workers   # meta_grad checks them

    @property
    def label(self) -> str:
        """``"bilevel batching=threads workers=2"``: the name with what sets its speed (in the calling thread)."""
        if self.batching == "threads":   # each worker with one intra-op thread
            return f"{self.name} batching=threads workers={self.workers or torch.get_num_threads()}"
        return f"{self.name} batching={self.batching} threads={torch.get_num_threads()}"

    def meta_grad(self, inner, outer) -> dict[str, torch.Tensor]:
        # One inner step is not meant to converge: no convergence check.
        return bl.meta_grad(self.method, self.problem, self.params, inner, outer, batching=self.batching,
                            workers=self.workers, on_nonconvergence="ignore").grad

    def step(self, inner, outer) -> None:
        grad = self.meta_grad(inner, outer)
        for name, value in self.params.items():
            value.grad = grad[name]
        self.opt.step()

    def hparams(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self.params.items()}

    def state_dict(self) -> dict:
        return {"params": self.hparams(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["params"].keys() != self.params.keys():
            raise ValueError(f"BilevelMAML.load_state_dict: the saved parameters {sorted(state['params'])} are not "
                             f"the model's {sorted(self.params)}.")
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(state["params"][name])   # in place: Adam keeps the same tensors
        self.opt.load_state_dict(state["opt"])


def build(data, seed: int = 0, batching: str = "loop", workers: int | None = None):
    """``(model, learn2learn side, bilevel side, train sampler, validation sampler)``, both sides on one init.

    ``batching``, ``workers``: bilevel's, as ``BilevelMAML``'s.
    """
    l2l = bl_l2l.load()
    split = make_split(data, "maml", seed=1)
    samplers = {name: TaskSampler(data.images, split[name], ways=WAYS, shots=SHOTS, queries=QUERIES,
                                  rotation="per_task", seed=seed + offset)
                for name, offset in (("train", 0), ("val", VAL_SEED))}
    torch.manual_seed(seed)
    model = l2l.vision.models.OmniglotCNN(output_size=WAYS)
    # learn2learn's MAML owns (and its Adam updates) the module it wraps: give it a copy.
    return (model, Learn2learnMAML(l2l, copy.deepcopy(model)), BilevelMAML(model, batching=batching, workers=workers),
            samplers["train"], samplers["val"])


def batches(tasks):
    """``(support batch, query batch)`` of a ``Tasks`` stack, as ``meta_grad`` takes them."""
    return (tasks.support, tasks.support_labels), (tasks.query, tasks.query_labels)


def check_same_start(sides, inner, outer, rtol: float = GRAD_RTOL) -> dict:
    """Assert that both sides hold the same weights and give the same meta-gradient on ``(inner, outer)``.

    Returns ``{"grad_rel_diff": ‖g_a − g_b‖ / ‖g_a‖ over all parameters, "worst": the parameter with the
    largest difference, "grad_norm": ‖g_a‖}``.

    Raises:
        RuntimeError: the initial weights differ, or the meta-gradients differ by more than ``rtol``.
    """
    a, b = sides
    ha, hb = a.hparams(), b.hparams()
    if ha.keys() != hb.keys() or any(not torch.equal(ha[k], hb[k]) for k in ha):
        raise RuntimeError(f"check_same_start: {a.name} and {b.name} start from different weights; build both from "
                           f"one model (build()).")
    ga, gb = ({k: v.detach().clone() for k, v in side.meta_grad(inner, outer).items()} for side in (a, b))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ga.values()))
    diff = {k: float(torch.linalg.vector_norm((ga[k] - gb[k]).double()) / norm) for k in ga}
    rel = float(torch.sqrt(sum(torch.tensor(d) ** 2 for d in diff.values())))
    worst = max(diff, key=diff.get)
    if not rel <= rtol:
        raise RuntimeError(f"check_same_start: the meta-gradients of {a.name} and {b.name} on the first batch differ "
                           f"by {rel:.2e} relative (> {rtol:.0e}; worst: {worst}); they do not compute the same "
                           f"thing.")
    return {"grad_rel_diff": rel, "worst": worst, "grad_norm": float(norm)}


def experiment(args) -> dict:
    """What defines an experiment: a session that resumes it must agree on all of it."""
    return {"seed": args.seed, "val_tasks": args.val_tasks, "val_every": args.val_every,
            "targets": [f"{t:g}" for t in sorted(args.targets)], "threads": args.threads,
            "bilevel_batching": args.bilevel_batching, "bilevel_workers": args.bilevel_workers, "ways": WAYS,
            "shots": SHOTS, "queries": QUERIES, "meta_batch": META_BATCH, "fast_lr": FAST_LR, "meta_lr": META_LR,
            "adaptation_steps": ADAPTATION_STEPS, "torch": str(torch.__version__),   # not TorchVersion: plain types
            "learn2learn": importlib.metadata.version("learn2learn")}


def experiment_differences(saved: dict, now: dict) -> list[str]:
    """``["--seed 0 in the checkpoint, 1 now", ...]``: the experiment-defining values that differ."""
    options = ("seed", "val_tasks", "val_every", "targets", "threads", "bilevel_batching", "bilevel_workers")
    saved = {"bilevel_batching": "loop", "bilevel_workers": None, **saved}   # checkpoints older than the options
    return [f"{'--' + k.replace('_', '-') if k in options else k} {saved.get(k)} in the checkpoint, {now[k]} now"
            for k in now if saved.get(k) != now[k]]


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` through ``tasks.run_folder.atomic_write``: a session killed at any moment leaves either the
    previous checkpoint or the new one, never a torn file."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, read with ``weights_only=True`` (tensors and plain Python values only)."""
    state = torch.load(path, weights_only=True)
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not a checkpoint of this benchmark (format {CHECKPOINT_FORMAT}).")
    return state


def table(results) -> str:
    """The Markdown table of the ``result`` records."""
    targets = sorted({t for r in results for t in r["reached"]}, key=float)
    head = ["implementation", "meta-steps", "wall s / meta-step", "CPU s / meta-step", "best val acc (step)"]
    head += [f"to {100 * float(t):g} %: training wall / CPU min (step), experiment wall h" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        per_step = [("-" if r[k] is None else f"{r[k]:.3f}") for k in ("median_wall_s", "median_cpu_s")]
        row = [r["impl"], str(r["meta_steps"]), *per_step,
               f"{100 * r['best_val_acc']:.2f} % ({r['best_step']})"]
        for t in targets:
            hit = r["reached"][t]
            row.append("not reached" if hit is None else
                       f"{hit['wall_min']:.2f} / {hit['cpu_min']:.2f} ({hit['step']}), "
                       f"{hit['experiment_min'] / 60:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(path: Path, window: int = 3) -> str:
    """Time to each target, read from the validation records of the last experiment in ``path``.

    The first validation at or above a target is one draw from a noisy curve (1,000 tasks: ±0.5 points); a crossing
    that stays is the first validation whose mean with the ``window - 1`` before it reaches the target. Both are
    given in training wall minutes, with the ratio of the two implementations.
    """
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [r for r in records if r["kind"] == "start"]
    if not starts:
        raise ValueError(f"{path} holds no experiment (no 'start' record).")
    date, targets = starts[-1]["date"], starts[-1]["argv"]["targets"]
    vals: dict[str, list] = {}
    for r in records:
        if r["kind"] == "val" and r["date"] == date:
            vals.setdefault(r["impl"], []).append((r["step"], r["val_acc"], r["train_wall_s"] / 60))

    def first(curve, target, n):
        for i in range(n - 1, len(curve)):
            if sum(acc for _, acc, _ in curve[i - n + 1:i + 1]) / n >= target:
                return curve[i][0], curve[i][2]
        return None

    head = ["target", *(f"{impl}: {how}" for how in ("first validation", f"mean of {window}") for impl in vals),
            "ratio (first / mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in targets:
        found = {(impl, n): first(curve, t, n) for impl, curve in vals.items() for n in (1, window)}
        cells = [f"{100 * t:g} %"] + [("not reached" if found[impl, n] is None else
                                        f"step {found[impl, n][0]}, {found[impl, n][1]:.2f} min")
                                       for n in (1, window) for impl in vals]
        a, b = list(vals)[:2] if len(vals) >= 2 else (None, None)
        ratios = [f"{found[a, n][1] / found[b, n][1]:.2f}x" if a and found[a, n] and found[b, n] else "-"
                  for n in (1, window)]
        lines.append("| " + " | ".join(cells + [" / ".join(ratios)]) + " |")
    return "\n".join(lines)


def main(argv=None, data=None):
    if argv is None:
        argv = sys.argv[1:]
    if "--report" in argv:   # no training: the table of an experiment's records (--out)
        parser = argparse.ArgumentParser(description="time to each target from the records of --out")
        parser.add_argument("--report", action="store_true")
        parser.add_argument("--out", type=Path, required=True, help="the experiment's JSON lines")
        parser.add_argument("--window", type=int, default=3, help="validations averaged for a crossing that stays")
        args = parser.parse_args(argv)
        if not args.out.is_file():
            parser.error(f"--out {args.out}: no such file")
        if args.window < 1:
            parser.error(f"--window must be positive, got {args.window}")
        print(report(args.out, args.window))
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=600.0,
                        help="wall-clock budget of this session (invocation), not of the experiment")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="meta-steps of each in this session, not in the experiment (default: no limit)")
    parser.add_argument("--val-every", type=int, default=100, help="meta-steps between validations")
    parser.add_argument("--val-tasks", type=int, default=1000, help="fixed validation tasks (5 queries each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (learn2learn's side; bilevel's with --bilevel-batching loop)")
    parser.add_argument("--bilevel-batching", choices=("loop", "threads"), default="loop",
                        help="bilevel's meta_grad batching: the tasks one after another on --threads intra-op "
                             "threads, or in --bilevel-workers task threads of one intra-op thread each")
    parser.add_argument("--bilevel-workers", type=int, default=None,
                        help="task threads of --bilevel-batching threads (default: --threads)")
    parser.add_argument("--data", default=None, help="Omniglot folder (default: $BILEVEL_DATA, see load_omniglot)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="validation accuracies")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and training tasks")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "l2l_time_to_accuracy.jsonl",
                        help="JSON lines, appended")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the experiment's checkpoint (default: --out with the suffix .ckpt.pt)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the experiment of --checkpoint (same seed, targets, threads, bilevel "
                             "batching and workers, validation)")
    args = parser.parse_args(argv)
    for key in ("max_minutes", "val_every", "val_tasks", "threads"):
        if not getattr(args, key) > 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.bilevel_workers is not None and args.bilevel_batching != "threads":
        parser.error(f"--bilevel-workers applies to --bilevel-batching threads only (got "
                     f"--bilevel-batching {args.bilevel_batching})")
    if args.bilevel_batching == "threads":
        args.bilevel_workers = args.threads if args.bilevel_workers is None else args.bilevel_workers
        if args.bilevel_workers < 1:
            parser.error(f"--bilevel-workers must be positive, got {args.bilevel_workers}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be positive, got {args.max_steps}")
    if not all(0 <= t <= 1 for t in args.targets):
        parser.error(f"--targets are accuracies in [0, 1], got {args.targets}")
    ckpt_path = args.checkpoint or args.out.with_suffix(".ckpt.pt")
    defining = experiment(args)
    saved = None
    if args.resume:
        if not ckpt_path.exists():
            parser.exit(2, f"{parser.prog}: error: --resume: no checkpoint {ckpt_path}; start the experiment "
                           f"without --resume, or give its --checkpoint\n")
        saved = load_checkpoint(ckpt_path)
        differ = experiment_differences(saved["experiment"], defining)
        if differ:
            parser.exit(2, f"{parser.prog}: error: --resume: {ckpt_path} is another experiment: "
                           f"{'; '.join(differ)}; resume it with its options, or start a new experiment with "
                           f"another --checkpoint\n")
    elif ckpt_path.exists():
        parser.exit(2, f"{parser.prog}: error: the checkpoint {ckpt_path} exists: continue its experiment with "
                       f"--resume, or start a new one with another --checkpoint\n")
    targets = defining["targets"]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    before = saved["experiment_s"] if saved else 0.0   # the wall clock of the earlier sessions

    def experiment_s():
        return before + time.perf_counter() - start

    # Stop at the next round boundary on the first SIGTERM / SIGINT; the previous handlers take the second one.
    stop = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, frame):
        stop.append(signal.Signals(signum).name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"{stop[0]}: stopping after this round (again: at once)", flush=True)

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        return _run(args, data, ckpt_path, saved, defining, targets, start, experiment_s, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args, data, ckpt_path, saved, defining, targets, start, experiment_s, stop):
    """The rounds of one session of `main`: set up or resume, train, checkpoint, report."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    date = saved["date"] if saved else now
    session = saved["session"] + 1 if saved else 1

    data = data or load_omniglot(("images_background", "images_evaluation"), args.data)
    model, l2l_side, bl_side, train, val = build(data, args.seed, args.bilevel_batching, args.bilevel_workers)
    sides = (l2l_side, bl_side)
    names = [s.name for s in sides]
    # what sets each side's speed: learn2learn's intra-op threads, bilevel's batching
    setup = f"{l2l_side.name} threads={args.threads}, {bl_side.label}"
    val_tasks = val.sample(0, args.val_tasks)
    val_batches = [batches(val_tasks)]
    call = bl_l2l.module_call(model)

    if saved:
        step, last_val = saved["step"], saved["last_val"]
        for side in sides:
            # The untimed warm-up, as check_same_start is on a new experiment. Before loading: learn2learn's
            # forward in training mode updates the batch-norm running statistics, which the load then restores.
            side.meta_grad(*batches(train.sample(step, META_BATCH)))
            side.load_state_dict(saved["sides"][side.name])
        clock, reached = saved["clock"], saved["reached"]
        per_step = {n: {k: v.tolist() for k, v in saved["per_step"][n].items()} for n in names}
        best = {n: tuple(saved["best"][n]) for n in names}
    else:
        first = train.sample(0, META_BATCH)
        check = check_same_start(sides, *batches(first))   # also the warm-up of both, untimed
        step, last_val = 0, None
        clock = {n: {"wall": 0.0, "cpu": 0.0} for n in names}
        per_step = {n: {"wall": [], "cpu": []} for n in names}
        reached = {n: dict.fromkeys(targets) for n in names}
        best = {n: (-1.0, 0) for n in names}

    def checkpoint():
        save_checkpoint({
            "format": CHECKPOINT_FORMAT, "experiment": defining, "date": date, "session": session,
            "step": step, "last_val": last_val, "sides": {side.name: side.state_dict() for side in sides},
            "clock": clock, "per_step": {n: {k: torch.tensor(v, dtype=torch.float64) for k, v in t.items()}
                                         for n, t in per_step.items()},
            "reached": reached, "best": {n: list(b) for n, b in best.items()}, "experiment_s": experiment_s(),
        }, ckpt_path)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:

        def write(record):
            out.write(json.dumps({"date": date, **record}) + "\n")
            out.flush()

        argv = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        argv["checkpoint"] = str(ckpt_path)
        if saved:
            write({"kind": "resume", "at": now, "session": session, "step": step, "argv": argv,
                   "experiment_s": experiment_s(), "load": os.getloadavg()})
            print(f"resumed {ckpt_path} at meta-step {step} (session {session}); {setup}", flush=True)
        else:
            write({"kind": "start", "argv": argv, "threads": args.threads, "bilevel_batching": args.bilevel_batching,
                   "bilevel_workers": args.bilevel_workers, "sides": setup, "torch": torch.__version__,
                   "learn2learn": defining["learn2learn"], "ways": WAYS, "shots": SHOTS, "queries": QUERIES,
                   "meta_batch": META_BATCH, "fast_lr": FAST_LR, "meta_lr": META_LR,
                   "adaptation_steps": ADAPTATION_STEPS, "load": os.getloadavg(), **check})
            print(setup, flush=True)
            print(f"same initial weights; first meta-gradient: relative difference {check['grad_rel_diff']:.1e} "
                  f"(norm {check['grad_norm']:.3g}, worst {check['worst']})", flush=True)

        def validate():
            # One evaluator for both: bilevel's inner solver (the training step) on each side's weights, with the
            # network run as learn2learn runs it in training mode (module_call), so both are measured alike.
            nonlocal last_val
            accs = {}
            for side in sides:
                n = side.name
                accs[n], ci = accuracy(call, bl_side.problem, side.hparams(), val_batches)
                best[n] = max(best[n], (accs[n], step), key=lambda b: b[0])
                for t in targets:
                    if reached[n][t] is None and accs[n] >= float(t):
                        reached[n][t] = {"step": step, "wall_min": clock[n]["wall"] / 60,
                                         "cpu_min": clock[n]["cpu"] / 60, "experiment_min": experiment_s() / 60}
                write({"kind": "val", "impl": n, "step": step, "val_acc": accs[n], "ci95": ci,
                       "train_wall_s": clock[n]["wall"], "train_cpu_s": clock[n]["cpu"],
                       "elapsed_s": time.perf_counter() - start, "experiment_s": experiment_s(),
                       "load": os.getloadavg()})
            last_val = step
            checkpoint()
            print(f"step {step}: validation accuracy " + ", ".join(f"{n} {100 * a:.2f} %" for n, a in accs.items()),
                  flush=True)

        first_step, stopped = step, "max-minutes"
        if step % args.val_every == 0 and last_val != step:   # step 0, or a validation the last session skipped
            validate()
        while True:
            if all(v is not None for n in names for v in reached[n].values()):
                stopped = "targets reached"
                break
            if stop:
                stopped = stop[0]
                break
            if time.perf_counter() - start >= 60 * args.max_minutes:
                break
            if args.max_steps is not None and step - first_step >= args.max_steps:
                stopped = "max-steps"
                break
            inner, outer = batches(train.sample(step, META_BATCH))
            for side in (sides if step % 2 == 0 else sides[::-1]):   # alternate who runs first
                wall, cpu = time.perf_counter(), time.process_time()
                side.step(inner, outer)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                clock[side.name]["wall"] += wall
                clock[side.name]["cpu"] += cpu
                per_step[side.name]["wall"].append(wall)
                per_step[side.name]["cpu"].append(cpu)
            step += 1
            # Past the budget or asked to stop, leave the validation to the next session (it runs it first).
            if step % args.val_every == 0 and not stop and time.perf_counter() - start < 60 * args.max_minutes:
                validate()
        checkpoint()

        results = []
        for n in names:
            record = {"kind": "result", "impl": n, "meta_steps": step, "stopped": stopped, "session": session,
                      "session_meta_steps": step - first_step,
                      "median_wall_s": statistics.median(per_step[n]["wall"]) if step else None,
                      "median_cpu_s": statistics.median(per_step[n]["cpu"]) if step else None,
                      "train_wall_s": clock[n]["wall"], "train_cpu_s": clock[n]["cpu"],
                      "best_val_acc": best[n][0], "best_step": best[n][1], "reached": reached[n],
                      "elapsed_s": time.perf_counter() - start, "experiment_s": experiment_s(),
                      "load": os.getloadavg()}
            write(record)
            results.append(record)
    print(f"\n{step} meta-steps each, stopped: {stopped}; {args.val_tasks} validation tasks every {args.val_every} "
          f"meta-steps; {setup}; {date}, session {session}, {experiment_s() / 3600:.2f} h in all; "
          f"-> {args.out}, {ckpt_path}")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
