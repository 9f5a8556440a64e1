"""The compressor library and version behind each stream codec of a ``transformed`` delta.

A transformed delta recompresses the result's gzip, xz and zstd streams on the
vehicle, and only the same library (often only the same version) reproduces
the compressed bytes exactly. The creator (``server.delta.transforms``)
records :func:`library_name` with the parameters it verified; the applier
(``client.delta_transforms``) names its own when its recompression does not
match, so the mismatch says which versions differ.
"""

from __future__ import annotations

import ctypes
import functools
import zlib

import zstandard

from signing import delta_format as fmt


def library_name(codec: int) -> str:
    """The compressor and version this machine (re)compresses ``codec`` streams with."""
    if codec == fmt.STREAM_GZIP:
        return f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    if codec == fmt.STREAM_XZ:
        return f"liblzma {_xz_version()}"
    return "zstd " + ".".join(str(part) for part in zstandard.ZSTD_VERSION)


@functools.cache
def _xz_version() -> str:
    # Python's lzma module does not say which liblzma it runs; ask the shared library.
    try:
        liblzma = ctypes.CDLL("liblzma.so.5")
        liblzma.lzma_version_string.restype = ctypes.c_char_p
        return str(liblzma.lzma_version_string().decode("ascii"))
    except (OSError, AttributeError, UnicodeDecodeError):
        return "unknown"
