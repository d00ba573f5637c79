"""Bridges to other meta-learning libraries. Each bridge imports its library only when called.

- ``bilevel.interop.learn2learn``: learn2learn task sets as meta-batches for ``bilevel.meta_grad``, and any
  ``torch.nn.Module`` (learn2learn's ``OmniglotCNN``, ``CNN4``, ...) as a loss on ``params`` dicts.
"""

from . import learn2learn

__all__ = ["learn2learn"]
