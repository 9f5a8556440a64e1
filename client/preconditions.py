"""Preconditions: is the vehicle ready to install right now? (UN R156 7.1.2.x)

An update may be downloaded and verified at any time, but installing it
starts only when every configured precondition holds: battery charged
enough, vehicle parked with ignition off, the driver's consent given...
Each precondition is either

* a **command** (exit status 0 means "ready"; its first line of output is
  the reason shown while it is not), or
* a Python **hook** ``"package.module:function"`` returning ``True`` or a
  string saying why not (a hook that raises counts as "not ready").

The agent checks them just before an install; while one fails, the update
waits (the agent says which precondition and why) and is retried at the
next poll. Nothing is written to any slot while waiting.

A director target marked ``installOnConsent`` (a campaign in "install on
consent" mode, :mod:`signing.metadata`) needs a precondition named
:data:`CONSENT`: the driver's consent, however the vehicle asks for it.
A vehicle that has none configured waits rather than install unasked
(:func:`missing_consent`).
"""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Callable, Sequence

import msgspec


class Precondition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[preconditions]]`` table: a ``command`` or a ``hook``, never both."""

    name: str
    command: tuple[str, ...] = ()
    hook: str = ""
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if bool(self.command) == bool(self.hook):
            raise ValueError(
                'needs exactly one of command (a list of strings) or hook ("module:function")'
            )
        if self.hook and ":" not in self.hook:
            raise ValueError('hook: must look like "package.module:function"')
        if self.timeout <= 0:
            raise ValueError("timeout: must be > 0")


def _run_hook(spec: str) -> str | None:
    module_name, _, attr = spec.partition(":")
    try:
        fn: Callable[[], object] = getattr(importlib.import_module(module_name), attr)
        result = fn()
    except Exception as exc:  # a broken hook must never let an install through
        return f"hook {spec} failed: {type(exc).__name__}: {exc}"
    if result is True:
        return None
    return str(result) if result else f"hook {spec} said not ready"


def _run_command(argv: Sequence[str], timeout: float) -> str | None:
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"{argv[0]} timed out after {timeout:g} s"
    except OSError as exc:
        return f"{argv[0]} could not run: {exc.strerror}"
    if proc.returncode == 0:
        return None
    output = (proc.stdout or proc.stderr).decode(errors="replace").strip().splitlines()
    return output[0][:300] if output else f"{argv[0]} exited {proc.returncode}"


#: The name of the precondition that says the driver consented.
CONSENT = "consent"


def missing_consent(preconditions: Sequence[Precondition]) -> str | None:
    """Why an install-on-consent image must wait although every precondition holds, or None."""
    if any(pre.name == CONSENT for pre in preconditions):
        return None
    return (
        f"{CONSENT}: the campaign installs only with the driver's consent, and no "
        f'[[preconditions]] named "{CONSENT}" is configured'
    )


def unmet_precondition(preconditions: Sequence[Precondition]) -> str | None:
    """``None`` when all hold, else ``"<name>: <why>"`` for the first that does not."""
    for pre in preconditions:
        why = _run_hook(pre.hook) if pre.hook else _run_command(pre.command, pre.timeout)
        if why is not None:
            return f"{pre.name}: {why}"
    return None
