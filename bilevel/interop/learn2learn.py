"""learn2learn task sets and models with bilevel's hypergradient engine (guide: ``docs/learn2learn.md``).

learn2learn (Arnold et al., 2020, https://github.com/learnables/learn2learn) describes few-shot tasks with a
``Taskset`` (formerly ``TaskDataset``) over a ``MetaDataset`` and task transforms (``NWays``, ``KShots``,
``LoadData``, ``RemapLabels``), and differentiates through adaptation with a stateful wrapper,
``l2l.algorithms.MAML``. Here a task set becomes a stream of stacked meta-batches for ``bilevel.meta_grad``
(`meta_batches`), and a module becomes a pure loss on a ``params`` dict through ``torch.func.functional_call``
(`module_loss`), so every bilevel method applies.

The support/query split is learn2learn's own (``fast_adapt`` in its ``examples/vision/maml_omniglot.py``): with
``KShots(k=2·shots)``, the even positions ``0, 2, …, 2·(ways·shots − 1)`` of a task are the support set and the
others the query set. Deviations from learn2learn's MAML: ``meta_grad`` returns the mean of the per-task
gradients, which is what learn2learn's examples compute by scaling the summed gradients by ``1/meta_batch_size``;
adaptation never clones or mutates a module; batch norm always uses the batch's statistics (see `module_loss`).

learn2learn 0.2.0 is installed by ``bash tools/install_learn2learn.sh``: its PyPI sdist does not build on Python
3.11 as shipped, and its requirements would replace a CPU build of torch.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, replace_all_batch_norm_modules_

__all__ = ["load", "split_task", "meta_batches", "module_call", "module_loss", "meta_params"]

INSTALL = "bash tools/install_learn2learn.sh (from a bilevel checkout)"


def load() -> types.ModuleType:
    """The ``learn2learn`` package: the full import if it works, else its torchvision- and gym-free parts.

    ``import learn2learn`` imports ``learn2learn.gym`` (needs gym) and ``learn2learn.vision.datasets`` (needs
    torchvision, whose PyPI wheels do not load next to a CPU build of torch). When that import fails for one of
    those two reasons, this returns a package holding ``data`` (``MetaDataset``, ``Taskset``, ``transforms``),
    ``algorithms`` (``MAML``, ``MetaSGD``), ``nn``, ``utils`` and ``vision.models`` (``OmniglotCNN``, ``CNN4``, ...),
    loaded from the installed files with empty parent packages.

    Raises:
        ImportError: learn2learn is not installed (the message gives the install command).
    """
    loaded = sys.modules.get("learn2learn")
    if loaded is not None and hasattr(loaded, "data") and hasattr(loaded, "algorithms"):
        return loaded  # imported before, in full or by this function
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"learn2learn is not installed; install it with {INSTALL}.")
    try:
        return importlib.import_module("learn2learn")
    except ImportError as err:
        if getattr(err, "name", None) not in ("gym", "torchvision"):
            raise
        missing = err.name
    for name in [n for n in sys.modules if n == "learn2learn" or n.startswith("learn2learn.")]:
        del sys.modules[name]  # a half-initialised package from the failed import
    root = spec.submodule_search_locations[0]
    for name in ("learn2learn", "learn2learn.algorithms", "learn2learn.vision"):
        package = types.ModuleType(name)  # empty: its __init__ (which imports gym / torchvision) is skipped
        package.__path__ = [root + name[len("learn2learn"):].replace(".", "/")]
        package.__package__ = name
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__
        sys.modules[name] = package
        if "." in name:
            setattr(sys.modules["learn2learn"], name.rsplit(".", 1)[1], package)
    l2l = sys.modules["learn2learn"]
    l2l.__doc__ = f"learn2learn without its gym and vision.datasets modules ({missing} is not importable)."
    for name in ("utils", "nn", "data", "algorithms.maml", "algorithms.meta_sgd", "vision.models"):
        module = importlib.import_module(f"learn2learn.{name}")
        parent, _, child = f"learn2learn.{name}".rpartition(".")
        setattr(sys.modules[parent], child, module)
    l2l.algorithms.MAML = l2l.algorithms.maml.MAML
    l2l.algorithms.MetaSGD = l2l.algorithms.meta_sgd.MetaSGD
    return l2l


def split_task(task, ways: int, shots: int):
    """Split one learn2learn task ``(X, y)`` into a support and a query batch, as learn2learn's examples do.

    Args:
        task: ``(X, y)`` as returned by ``Taskset.sample()`` (after ``LoadData``): ``ways·k`` samples with
            ``k >= 2·shots`` per class.
        ways, shots: classes per task and support samples per class.

    Returns:
        ``((X_support, y_support), (X_query, y_query))``: the even positions ``0, 2, …, 2·(ways·shots − 1)`` and the
        remaining ones.
    """
    if not (isinstance(task, (tuple, list)) and len(task) == 2):
        raise TypeError(f"split_task: a task is (X, y) as Taskset.sample() returns it with LoadData in its "
                        f"transforms; got {type(task).__name__}.")
    X, y = task
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    n = ways * shots
    if X.shape[0] != y.shape[0] or X.shape[0] < 2 * n:
        raise ValueError(f"split_task: the task has {X.shape[0]} inputs and {y.shape[0]} labels; ways={ways}, "
                         f"shots={shots} needs at least 2·ways·shots = {2 * n} of each: sample it with "
                         f"NWays(n={ways}) and KShots(k={2 * shots}).")
    support = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    support[torch.arange(n, device=X.device) * 2] = True
    return (X[support], y[support]), (X[~support], y[~support])


def meta_batches(taskset, tasks_per_batch: int, ways: int, shots: int, *, num_batches: Optional[int] = None,
                 device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> Iterator:
    """Meta-batches for `bilevel.meta_grad` from a learn2learn ``Taskset`` (anything with ``sample()``).

    Each item is ``(inner_batches, outer_batches)``: the support and query sets of ``tasks_per_batch`` tasks from
    ``taskset.sample()``, split by `split_task` and stacked along a new leading task dimension, e.g.
    ``X_support [T, ways·shots, 1, 28, 28]`` and ``y_support [T, ways·shots]``. Labels become int64.

    Args:
        taskset: a ``learn2learn.data.Taskset`` (or ``TaskDataset``) whose transforms end with ``LoadData`` (and usually
            ``RemapLabels``, so labels are ``0..ways-1`` as a classifier's outputs need).
        tasks_per_batch: tasks per meta-batch (T).
        ways, shots: as `split_task`.
        num_batches: stop after this many meta-batches; ``None``: an endless stream.
        device, dtype: move the inputs (not the labels) there.
    """
    for key, value in (("tasks_per_batch", tasks_per_batch), ("ways", ways), ("shots", shots)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"meta_batches({key}={value!r}): must be a positive int.")
    if not callable(getattr(taskset, "sample", None)):
        raise TypeError(f"meta_batches: taskset must have a sample() method like learn2learn.data.Taskset; got "
                        f"{type(taskset).__name__}.")
    count = 0
    while num_batches is None or count < num_batches:
        support, query = zip(*(split_task(taskset.sample(), ways, shots) for _ in range(tasks_per_batch)))
        yield tuple((torch.stack([x for x, _ in part]).to(device=device, dtype=dtype),
                     torch.stack([y for _, y in part]).to(device=device, dtype=torch.long))
                    for part in (support, query))
        count += 1


def module_call(module: torch.nn.Module) -> Callable:
    """``(params, X) -> module(X)`` with ``params`` in place of the module's parameters (``functional_call``).

    Runs a private copy of ``module``; the module itself is never changed. Batch norm layers of the copy always
    normalise with the statistics of the batch they see and keep no running statistics
    (``torch.func.replace_all_batch_norm_modules_``): updating running statistics in place cannot happen inside
    ``torch.func`` transforms, and learn2learn's ``OmniglotCNN`` and ``CNN4`` in training mode (how its MAML examples
    adapt and evaluate) use the batch statistics too, so their outputs are the same.

    Safe to call from several threads at once (``meta_grad(batching="threads")``): ``functional_call`` swaps a
    module's parameters in place for the duration of a call, so each thread runs its own copy, made at its first call.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module_call: expected a torch.nn.Module, got {type(module).__name__}.")
    module = copy.deepcopy(module)
    replace_all_batch_norm_modules_(module)
    # untying shared weights walks every submodule on each call: only when the module shares any
    shared = [t for _, t in (*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False))]
    tied = len({id(t) for t in shared}) < len(shared)
    local = threading.local()

    def call(params, X):
        copy_ = getattr(local, "module", None)
        if copy_ is None:
            copy_ = local.module = copy.deepcopy(module)
        return functional_call(copy_, params, (X,), tie_weights=tied)

    return call


def module_loss(module: torch.nn.Module, loss: Callable = F.cross_entropy) -> Callable:
    """``(params, hparams, batch) -> loss(module(X; params), y)``, the module run by `module_call`.

    Use the same loss as inner and outer loss of a meta-learning ``Problem``; ``hparams`` (the meta-parameters θ)
    enter through the problem's ``init`` (``bl.meta_init``) or a proximal term, not through this loss.

    Args:
        module: any ``torch.nn.Module`` whose forward takes the inputs ``X`` of a batch ``(X, y)``.
        loss: ``(outputs, y) -> scalar``; cross-entropy by default.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module_loss: expected a torch.nn.Module, got {type(module).__name__}.")
    call = module_call(module)

    def module_loss_fn(params, hparams, batch):
        X, y = batch
        return loss(call(params, X), y)

    return module_loss_fn


def meta_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters as a ``dict[str, Tensor]`` (detached copies): the ``hparams`` θ of meta-learning."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"meta_params: expected a torch.nn.Module, got {type(module).__name__}.")
    return {name: p.detach().clone() for name, p in module.named_parameters()}
