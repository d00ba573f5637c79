"""Omniglot images: find, validate, download and cache them as one 28x28 uint8 tensor.

The official layout (Lake et al., 2015) is ``<set>/<Alphabet>/characterNN/IIII_DD.png`` with 105x105 1-bit images,
where ``<set>`` is ``images_background`` (964 characters) or ``images_evaluation`` (659 characters), each character
drawn by 20 people. A set is read from an extracted folder ``<root>/<set>/`` or from ``<root>/<set>.zip``.

Local copies are validated by structure (character and drawing counts, image size), not by checksum, because
re-packed zips hold the same images in different containers. Downloads are verified against the official md5.

Decoding 32,460 PNGs takes a while, so the images are resized once (Lanczos, antialiased; inverted so strokes are
1 as in the MAML reference code) and cached under ``$BILEVEL_CACHE`` (default ``~/.cache/bilevel``). The cache is
derived data: a cache file that cannot be read or does not match its sources (shape, character names, source
fingerprint) is named in a warning and rebuilt; a cache folder that cannot be written is named in a warning and
the run continues without caching. A local zip that is not a readable archive is named as damaged, and replaced by
a verified download when downloads are allowed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..run_folder import atomic_write

__all__ = ["OmniglotImages", "load_omniglot", "resolve_root", "cache_dir", "OFFICIAL"]

IMAGE_SIZE = 105
DRAWINGS = 20
CACHE_VERSION = 2   # 2: the cache stores its sources' fingerprint

# name -> (url, md5, characters, alphabets) of the official files (github.com/brendenlake/omniglot).
OFFICIAL = {
    "images_background": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718", 964, 30),
    "images_evaluation": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811", 659, 20),
    "images_background_small1": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background_small1.zip",
        "e704a628b5459e08445c13499850abc4", 136, 5),
    "images_background_small2": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background_small2.zip",
        "b75a71a51d3b13f821f212756fe481fd", 156, 5),
}
_PNG = re.compile(r"^(\d{4})_(\d{2})\.png$")


@dataclass(frozen=True)
class OmniglotImages:
    """All drawings of some characters.

    Attributes:
        images: uint8 tensor ``[characters, 20, size, size]``, strokes bright (255), background 0.
        characters: ``"<set>/<Alphabet>/characterNN"`` for each row of ``images``.
    """

    images: torch.Tensor
    characters: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.characters)

    def subset(self, prefix: str) -> list[int]:
        """Indices of the characters whose name starts with ``prefix`` (e.g. ``"images_background/"``)."""
        return [i for i, c in enumerate(self.characters) if c.startswith(prefix)]


def cache_dir() -> Path:
    """``$BILEVEL_CACHE`` if set, else ``~/.cache/bilevel``."""
    return Path(os.environ.get("BILEVEL_CACHE") or Path.home() / ".cache" / "bilevel")


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The folder holding the Omniglot sets.

    ``root`` (from the config or an argument) wins, then ``$BILEVEL_DATA``, then ``<cache>/data``. A folder that
    contains an ``omniglot/`` sub-folder is taken to mean that sub-folder, so ``BILEVEL_DATA`` can point at a shared
    data folder holding several datasets.
    """
    base = Path(root) if root else Path(os.environ["BILEVEL_DATA"]) if os.environ.get("BILEVEL_DATA") \
        else cache_dir() / "data"
    base = base.expanduser()
    return base / "omniglot" if (base / "omniglot").is_dir() else base


def download(name: str, root: Path) -> Path:
    """Download an official zip into ``root`` and verify its md5; fail with a message saying where files go."""
    if name not in OFFICIAL:
        raise FileNotFoundError(f"Omniglot set {name!r} not found in {root} and it has no official download; "
                                f"put {name}/ or {name}.zip there.")
    url, md5, _, _ = OFFICIAL[name]
    target = root / f"{name}.zip"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except OSError as err:
        raise FileNotFoundError(
            f"Omniglot set {name!r} is missing and could not be downloaded from {url} ({err}). Put {name}.zip or "
            f"the extracted {name}/ folder in {root} (or point data.root / $BILEVEL_DATA at the folder holding "
            f"them).") from None
    digest = hashlib.md5(payload).hexdigest()
    if digest != md5:
        raise ValueError(f"download of {url} has md5 {digest}, expected {md5}: corrupt or changed upstream; "
                         f"place a verified copy at {target}.")
    atomic_write(target, lambda f: f.write(payload))
    return target


class _Source:
    """One Omniglot set, as an extracted folder or a zip, listing ``(character, [png names])``."""

    def __init__(self, name: str, root: Path, allow_download: bool):
        folder, archive = root / name, root / f"{name}.zip"
        if not folder.is_dir() and not archive.is_file():
            if not allow_download:
                raise FileNotFoundError(
                    f"Omniglot set {name!r} not found: expected {folder}/ or {archive}. Put the official files "
                    f"there, point data.root / $BILEVEL_DATA at the folder holding them, or set data.download=true.")
            archive = download(name, root)
        self.name = name
        self.zip = None if folder.is_dir() else _open_zip(name, root, archive, allow_download)
        self.where = str(folder if self.zip is None else archive)
        if self.zip is None:
            files = [p.relative_to(root).as_posix() for p in sorted(folder.glob("*/*/*.png"))]
        else:
            files = [n for n in self.zip.namelist() if n.endswith(".png")]
        chars: dict[str, list[str]] = {}
        for f in sorted(files):
            parts = f.split("/")
            if len(parts) != 4 or parts[0] != name or not _PNG.match(parts[3]):
                raise ValueError(f"{self.where}: unexpected entry {f!r}; expected "
                                 f"{name}/<Alphabet>/characterNN/IIII_DD.png (the official Omniglot layout)")
            chars.setdefault("/".join(parts[:3]), []).append(f)
        self.characters = chars
        self.fingerprint = hashlib.sha1(repr(sorted(
            (i.filename, i.file_size, i.CRC) for i in self.zip.infolist()) if self.zip else
            [(f, (root / f).stat().st_size) for f in files]).encode()).hexdigest()[:16]
        self.root = root

    def validate(self) -> None:
        """Check counts against the official set (1,623 characters x 20 drawings in total)."""
        if not self.characters:
            raise ValueError(f"{self.where}: no PNG files found; is this an Omniglot set?")
        for char, files in self.characters.items():
            if len(files) != DRAWINGS:
                raise ValueError(f"{self.where}: {char} has {len(files)} drawings, expected {DRAWINGS}; "
                                 f"the copy is incomplete, replace it with the official files.")
        if self.name in OFFICIAL:
            _, _, n_chars, n_alphabets = OFFICIAL[self.name]
            alphabets = {c.split("/")[1] for c in self.characters}
            if len(self.characters) != n_chars or len(alphabets) != n_alphabets:
                raise ValueError(f"{self.where}: {len(self.characters)} characters in {len(alphabets)} alphabets, "
                                 f"expected {n_chars} in {n_alphabets}; the copy is incomplete or not "
                                 f"{self.name}; replace it with the official files.")

    def read(self, member: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(member)
        return (self.root / member).read_bytes()


def _open_zip(name: str, root: Path, archive: Path, allow_download: bool) -> zipfile.ZipFile:
    """Open a local zip; a damaged one is named, and replaced by a verified download when that is allowed."""
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        problem = f"{archive} is damaged (not a readable zip archive: {err})"
    if not allow_download or name not in OFFICIAL:
        raise ValueError(f"{problem}; replace it with the official file"
                         f"{' or set data.download=true to fetch a verified copy' if name in OFFICIAL else ''}.")
    warnings.warn(f"{problem}; replacing it by a verified download.", RuntimeWarning, stacklevel=3)
    try:
        return zipfile.ZipFile(download(name, root))
    except (OSError, ValueError) as err:
        raise ValueError(f"{problem}, and no verified copy could be downloaded: {err}") from None


def _read_cache(path: Path, characters: list[str], size: int, fingerprint: str) -> OmniglotImages | None:
    """The cached tensor if ``path`` holds exactly what the sources would give; otherwise warn and return None."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        images = saved["images"]
        problem = None
        if saved.get("fingerprint") != fingerprint:
            problem = "its sources' fingerprint differs"
        elif list(saved["characters"]) != characters:
            problem = f"{len(saved['characters'])} characters instead of the sources' {len(characters)}"
        elif (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8
              or tuple(images.shape) != (len(characters), DRAWINGS, size, size)):
            problem = f"images of shape {tuple(getattr(images, 'shape', ()))}, expected " \
                      f"{(len(characters), DRAWINGS, size, size)} uint8"
    except Exception as err:   # truncated, empty, not a torch file, not a dict, ...: it is only a cache
        problem = f"unreadable: {(str(err).strip().splitlines() or [type(err).__name__])[0]}"
    if problem is None:
        return OmniglotImages(images, tuple(characters))
    warnings.warn(f"Omniglot image cache {path} is invalid ({problem}); rebuilding it from the sources.",
                  RuntimeWarning, stacklevel=3)
    return None


def _cache_writable(path: Path) -> bool:
    """Whether the cache folder of ``path`` can be written; if not, warn (the cache is optional) and return False."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError as err:
        warnings.warn(f"cannot write the Omniglot image cache {path} ({err.strerror or err}); continuing without a "
                      f"cache (set $BILEVEL_CACHE to a writable folder or data.cache=false).", RuntimeWarning,
                      stacklevel=3)
        return False


def _write_cache(path: Path, data: OmniglotImages, fingerprint: str) -> None:
    """Write the cache atomically; an unwritable cache folder is a warning, since the cache is optional."""
    try:
        atomic_write(path, lambda f: torch.save({"images": data.images, "characters": list(data.characters),
                                                  "fingerprint": fingerprint}, f))
    except OSError as err:
        warnings.warn(f"cannot write the Omniglot image cache {path} ({err.strerror or err}); continuing without a "
                      f"cache (set $BILEVEL_CACHE to a writable folder or data.cache=false).", RuntimeWarning,
                      stacklevel=3)


def _decode(source: _Source, member: str, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(source.read(member))) as im:
            im.load()
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"size {im.size}, expected {(IMAGE_SIZE, IMAGE_SIZE)}")
            im = im.convert("L").resize((size, size), resample=Image.LANCZOS)
    except Exception as err:
        raise ValueError(f"cannot read Omniglot image {source.where}::{member}: {err}. Replace the file with "
                         f"the official copy.") from None
    return 255 - np.asarray(im, dtype=np.uint8)


def load_omniglot(sets: tuple[str, ...] = ("images_background", "images_evaluation"), root=None, *,
                  size: int = 28, download: bool = True, cache: bool = True) -> OmniglotImages:
    """Load Omniglot sets as one uint8 tensor, decoding the PNGs only the first time.

    Args:
        sets: set names, e.g. ``("images_background", "images_evaluation")`` or ``("images_background_small1",)``.
        root: folder holding the sets (see :func:`resolve_root`).
        size: side of the resized images (28 in the MAML protocol).
        download: download missing official sets (md5-checked) instead of failing.
        cache: read/write the decoded tensor under :func:`cache_dir`.

    Returns:
        :class:`OmniglotImages` with characters in sorted order (set, alphabet, character).

    Raises:
        FileNotFoundError: a set is missing (and cannot be downloaded); the message says where to put it.
        ValueError: a set does not have the official structure, or an image cannot be decoded (named).
    """
    root = resolve_root(root)
    sources = [_Source(name, root, download) for name in sets]
    key = hashlib.sha1(repr((CACHE_VERSION, size, [(s.name, s.fingerprint) for s in sources])).encode())
    fingerprint = key.hexdigest()
    path = cache_dir() / f"omniglot-{size}px-{fingerprint[:16]}.pt"
    expected = [char for source in sources for char in sorted(source.characters)]
    if cache and (cached := _read_cache(path, expected, size, fingerprint)) is not None:
        return cached
    if cache:   # say so before the decoding, not after it
        cache = _cache_writable(path)
    characters, images = [], []
    for source in sources:
        source.validate()
        for char, files in sorted(source.characters.items()):
            characters.append(char)
            images.append(np.stack([_decode(source, f, size) for f in files]))
    data = OmniglotImages(torch.from_numpy(np.stack(images)), tuple(characters))
    if cache:
        _write_cache(path, data, fingerprint)
    return data
