"""Sinusoid regression (Finn et al., 2017): task sampler (``sampler``), the 40-40 MLP (``model``), configs
(``config``) and the training script (``train``: ``main(cfg)`` and the ``cli()`` behind ``examples/sinusoid.py``)."""
