"""Few-shot Omniglot: data (``data``), splits (``splits``), task sampler (``sampler``), conv4 (``model``), the
training script (``train``: ``main(cfg)`` and the ``cli()`` behind ``examples/omniglot_fewshot.py``), inference on
new tasks (``inference``) and multi-process training (``distributed``)."""
