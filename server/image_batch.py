"""Many images in one upload: the framing both ends of ``POST /api/v1/image/uploads`` share.

Publishing a release of many images used to cost one HTTP request (and one
audit record, and two fsyncs) per image, and read every image twice (hash,
then upload). A batch upload sends every image of a release in one
streamed request body, each image framed as::

    LENGTH   8 bytes, unsigned big-endian: the image's length in bytes
    BYTES    LENGTH bytes: the image
    SHA256   32 bytes: the SHA-256 of BYTES, as the sender computed it

and the body ends after the last frame. The sender hashes each image while
it streams it (:func:`encode_images`: one read of every file) and learns the
hashes it signs into targets metadata from that same pass; the receiver
(:meth:`server.image_repository.ImageRepository.store_upload_batch`) hashes
while it writes each image to ``uploads/``, compares with the sender's
SHA-256, fsyncs each file once and the directory once at the end.

The trailer, rather than a header, carries the hash so that neither side
reads an image twice. Both sides bound what they accept: at most
:data:`MAX_BATCH_IMAGES` images of at most :data:`MAX_IMAGE_BYTES` each.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from signing.exceptions import UptakeError

#: Most images one batch upload may hold.
MAX_BATCH_IMAGES = 10_000
#: Largest image a batch (or a single upload) may hold.
MAX_IMAGE_BYTES = 4 * 1024**3
HEADER = struct.Struct(">Q")
DIGEST_BYTES = 32
CHUNK_BYTES = 1024 * 1024


class ImageBatchError(UptakeError):
    """A batch upload could not be sent or was malformed; says which image and why."""


@dataclass(frozen=True)
class UploadedImage:
    """One image as a batch upload sent it: its length and the SHA-256 computed while sending."""

    path: Path
    length: int
    sha256: str


def batch_lengths(paths: Sequence[Path]) -> list[int]:
    """The length of each image in ``paths`` (what :func:`encode_images` will send)."""
    if len(paths) > MAX_BATCH_IMAGES:
        raise ImageBatchError(f"at most {MAX_BATCH_IMAGES} images per upload, not {len(paths)}")
    lengths = []
    for path in paths:
        try:
            length = path.stat().st_size
        except OSError as exc:
            raise ImageBatchError(f"cannot read {path}: {exc.strerror}") from exc
        if length > MAX_IMAGE_BYTES:
            raise ImageBatchError(f"{path} is larger than {MAX_IMAGE_BYTES} bytes")
        lengths.append(length)
    return lengths


def body_length(lengths: Sequence[int]) -> int:
    """The length of the body that frames images of ``lengths`` (its Content-Length)."""
    return sum(lengths) + len(lengths) * (HEADER.size + DIGEST_BYTES)


def encode_images(
    paths: Sequence[Path],
    lengths: Sequence[int],
    sent: list[UploadedImage],
    progress: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """The body of a batch upload of ``paths`` (of ``lengths``, from :func:`batch_lengths`),
    each read once; appends each image to ``sent`` once its hash is known.

    ``progress`` is called with the number of bytes of every chunk sent. A
    file whose length changed since :func:`batch_lengths` is refused.
    """
    for path, length in zip(paths, lengths, strict=True):
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, across yields
        except OSError as exc:
            raise ImageBatchError(f"cannot read {path}: {exc.strerror}") from exc
        with f:
            if os.fstat(f.fileno()).st_size != length:
                raise ImageBatchError(f"{path} changed while the release was being uploaded")
            digest = hashlib.sha256()
            yield HEADER.pack(length)
            left = length
            while left:
                chunk = f.read(min(left, CHUNK_BYTES))
                if not chunk:
                    raise ImageBatchError(f"{path} shrank while it was being sent")
                digest.update(chunk)
                left -= len(chunk)
                yield chunk
                if progress is not None:
                    progress(len(chunk))
            if f.read(1):
                raise ImageBatchError(f"{path} grew while it was being sent")
            yield digest.digest()
        sent.append(UploadedImage(path, length, digest.hexdigest()))
