"""Content keys for the dataset fingerprint (``cache_format.dataset_fingerprint``).

A cache stores ground truth and teacher outputs per image, so it must be refused when the data
it was made from changed. ``dataset.fingerprint_entries()`` gives one ``(image_id, key)`` pair per
image; ``dataset_fingerprint`` hashes the sorted pairs into the ``"sha256:<hex>"`` string the
cache header records. ``key`` is an integer (a 128-bit blake2b digest) over:

- the fingerprint version (:data:`FINGERPRINT_VERSION`, bumped when the key or the way masks
  are decoded changes, so that caches holding ground truth decoded the old way mismatch);
- the image file: its size in bytes and :data:`SAMPLE_BLOCKS` blocks of :data:`SAMPLE_BLOCK`
  bytes at evenly spaced offsets (first and last block included; files up to
  ``SAMPLE_BLOCKS * SAMPLE_BLOCK`` bytes are hashed whole). An image replaced by another one
  of the same size differs in its header/EXIF block and in its entropy-coded data, so a sample
  catches it; a change confined to bytes between the blocks (a bit flip on disk) is not the
  target and is left to the file system;
- the annotations, hashed fully (their bytes are read anyway by the open-time scan): the
  SA-1B JSON of the image; for ``folder`` the names and bytes of the image's mask PNGs; for
  ``coco`` the whole instances JSON plus ``include_crowd`` (any edit to the file changes every
  key, which is conservative: re-run precompute).

Neither modification times nor paths enter the key: a copied or moved dataset (``cp``,
``rsync`` without ``-t``, another cluster's mount) keeps its fingerprint, as a cache shared
with it must keep matching.

Cost: per image one open and SAMPLE_BLOCKS small reads, done once per process when a
fingerprint is first needed (precompute's header, the trainer's cache check), never in plain
data reading; ``bench/data_fingerprint.py`` measures it per 10k images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from maskteacher.data._io import DIGEST_BYTES, digest

FINGERPRINT_VERSION = 2
SAMPLE_BLOCK = 4096
SAMPLE_BLOCKS = 5

#: What a fingerprint mismatch means, for the messages of every caller that compares one.
FINGERPRINT_MISMATCH_HINT = (
    "the dataset changed since the cache was made (an edited annotation or a replaced image), "
    "the cache was made for other data, or by a maskteacher older than dataset fingerprint "
    f"v{FINGERPRINT_VERSION} (which hashed file sizes only); re-run maskteacher precompute for "
    "this dataset"
)


def sample_offsets(size: int) -> list[int]:
    """Start offsets of the sampled blocks of a file of ``size`` bytes (sorted, distinct)."""
    if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
        return [0]
    last = size - SAMPLE_BLOCK
    return sorted({round(k * last / (SAMPLE_BLOCKS - 1)) for k in range(SAMPLE_BLOCKS)})


def image_digest(path: Path) -> bytes:
    """Digest of an image file's size and sampled blocks (module docstring).

    Raises OSError when the file cannot be read (the caller words it).
    """
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            h.update(f.read())
            return h.digest()
        for offset in sample_offsets(size):
            f.seek(offset)
            h.update(f.read(SAMPLE_BLOCK))
    return h.digest()


def content_key(image: bytes, annotations: bytes) -> int:
    """The fingerprint entry's integer for one image: its digests under the current version."""
    salt = f"maskteacher-fingerprint-v{FINGERPRINT_VERSION}".encode()
    return int.from_bytes(digest(salt + image + annotations), "big")


def combine(parts: list[tuple[str, bytes]]) -> bytes:
    """One digest over named parts (e.g. a folder image's mask file names and digests)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name, part in parts:
        encoded = name.encode()
        h.update(len(encoded).to_bytes(4, "little") + encoded + part)
    return h.digest()
