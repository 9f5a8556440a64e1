"""The root of Uptake's exceptions.

Every error Uptake raises on purpose derives from :class:`UptakeError`, so
a caller that wants "anything Uptake refused" catches one class; the
subclasses name what failed (:class:`signing.names.InvalidNameError`,
:class:`signing.json_limits.UntrustedJsonError`, ...). Anything else that
escapes is a bug.
"""

from __future__ import annotations


class UptakeError(Exception):
    """Base class of every error Uptake raises on purpose."""
