"""Named, fixed class splits of Omniglot.

``"maml"``  The split of Vinyals et al. (2016) as used by the MAML reference code (Finn et al., 2017): all 1,623
            characters are pooled and shuffled by ``random.Random(seed)`` (its own RNG, never the global one),
            then 1,100 train / 100 validation / 423 test characters.
``"lake"``  Lake et al. (2015): train and validate on ``images_background`` (the validation characters are a
            seeded draw of ``num_val`` of them, or with ``val_alphabets=True`` whole background alphabets drawn
            until they hold at least ``num_val`` characters, so that within-alphabet validation tasks exist),
            test on ``images_evaluation``.

Both sort the character names before shuffling, so a split depends only on the seed and the set of characters.
"""

from __future__ import annotations

import random

from .data import OmniglotImages

__all__ = ["PROTOCOLS", "make_split", "alphabet"]

PROTOCOLS = ("maml", "lake")


def make_split(data: OmniglotImages, protocol: str = "maml", *, seed: int = 1, num_train: int = 1100,
               num_val: int = 100, background: str = "images_background",
               val_alphabets: bool = False) -> dict[str, list[int]]:
    """Split the characters of ``data`` into ``{"train", "val", "test"}`` lists of row indices.

    Args:
        data: the loaded images (with ``images_background`` and, for ``"lake"``, ``images_evaluation`` rows).
        protocol: ``"maml"`` or ``"lake"``.
        seed: seed of the split's own RNG.
        num_train: ``"maml"`` only: train characters (the test set is what remains after train and validation).
        num_val: validation characters.
        background: ``"lake"`` only: the set to train and validate on; every other set is the test set.
        val_alphabets: ``"lake"`` only: validate on whole background alphabets (for within-alphabet tasks).

    Raises:
        ValueError: unknown protocol, or too few characters for the requested sizes.
    """
    names = sorted(range(len(data)), key=lambda i: data.characters[i])
    rng = random.Random(seed)
    if protocol == "maml":
        if num_train + num_val >= len(names):
            raise ValueError(f"make_split('maml'): num_train + num_val = {num_train + num_val} leaves no test "
                             f"characters out of {len(names)}; lower data.num_train / data.num_val.")
        rng.shuffle(names)
        return {"train": names[:num_train], "val": names[num_train:num_train + num_val],
                "test": names[num_train + num_val:]}
    if protocol == "lake":
        evaluation = [i for i in names if not data.characters[i].startswith(background + "/")]
        background = [i for i in names if data.characters[i].startswith(background + "/")]
        if not evaluation or num_val >= len(background):
            raise ValueError(f"make_split('lake'): needs background characters for train + {num_val} validation "
                             f"and a separate evaluation set; got {len(background)} background and "
                             f"{len(evaluation)} evaluation characters (check data.background / data.evaluation).")
        if val_alphabets:
            groups = sorted({alphabet(data.characters[i]) for i in background})
            rng.shuffle(groups)
            held, count = set(), 0
            for g in groups:
                if count >= num_val:
                    break
                held.add(g)
                count += sum(alphabet(data.characters[i]) == g for i in background)
            val = [i for i in background if alphabet(data.characters[i]) in held]
            train = [i for i in background if alphabet(data.characters[i]) not in held]
            if not train:
                raise ValueError(f"make_split('lake'): num_val={num_val} takes every background alphabet for "
                                 f"validation; lower data.num_val.")
            return {"train": train, "val": val, "test": evaluation}
        rng.shuffle(background)
        return {"train": sorted(background[num_val:]), "val": sorted(background[:num_val]), "test": evaluation}
    raise ValueError(f"make_split: unknown protocol {protocol!r}; choose one of {PROTOCOLS}.")


def alphabet(character: str) -> str:
    """``"<set>/<Alphabet>"`` of a character name ``"<set>/<Alphabet>/characterNN"``."""
    return character.rsplit("/", 1)[0]
