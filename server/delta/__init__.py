"""Delta creation for the image repository (issue 4).

``create_delta(old, new, out)`` tries several methods (bsdiff4 with its
streams recompressed, zstd with the old image as dictionary, windowed bsdiff
for large images) and writes the smallest as an Uptake delta container
(:mod:`signing.delta_format`); ``client.delta_apply`` applies it. This package
needs only ``bsdiff4`` and ``zstandard``: no web or database dependencies.
"""

from server.delta.create import (
    DEFAULT_BASE_BUDGET,
    DEFAULT_WHOLE_LIMIT,
    DEFAULT_WINDOW_SIZE,
    DeltaCreationError,
    DeltaReport,
    create_delta,
)

__all__ = [
    "DEFAULT_BASE_BUDGET",
    "DEFAULT_WHOLE_LIMIT",
    "DEFAULT_WINDOW_SIZE",
    "DeltaCreationError",
    "DeltaReport",
    "create_delta",
]
