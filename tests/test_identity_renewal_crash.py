"""A certificate renewal cut short at any step leaves the vehicle a key and certificate that match
(attacker review F5).

Real files, a real CA (``server.certificates``) and the agent's real renewal
(:meth:`client.vehicle_identity.ClientIdentity.renew`); the crash is simulated by
stopping the renewal at its N-th file operation (each of its writes and renames), after which a
fresh start (:meth:`~client.vehicle_identity.ClientIdentity.finish_interrupted_renewal`) must
put a matching pair in place: the new one once its key replaced the old, and never a key with
another key's certificate. The recovery is then cut short at each of its own steps, too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import client.vehicle_identity as vehicle_identity
from client.vehicle_identity import ClientIdentity, IdentityError, create_identity
from server.certificates import CertificateAuthority
from signing.atomic_file import write_atomic
from tests.uptake_fixtures import PASSWORD

CA = CertificateAuthority.generate("device CA")
VIN = "VINCRASH"
#: renew(): write key.next, write crt.next, rename key, rename crt
RENEWAL_STEPS = 4


class SimulatedCrash(BaseException):
    """The power went at this step (BaseException: nothing in the code under test catches it)."""


def _issue(csr: str) -> str:
    return CA.issue(csr, VIN).public_bytes(serialization.Encoding.PEM).decode()


def _identity(tmp: Path) -> tuple[ClientIdentity, bytes]:
    key_path, cert_path = tmp / "tls" / "client.key", tmp / "tls" / "client.crt"
    csr = create_identity(key_path, VIN, PASSWORD.encode())
    cert_path.write_text(_issue(csr))
    return ClientIdentity(cert_path, key_path, PASSWORD.encode()), cert_path.read_bytes()


def _crashing_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the first ``step - 1`` file operations of vehicle_identity happen, crash at ``step``."""
    done = [0]

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any, **kwargs: Any) -> Any:
            done[0] += 1
            if done[0] == step:
                raise SimulatedCrash(step)
            return real(*args, **kwargs)

        return operation

    class CountedOs:  # the module's own renames only (write_atomic renames inside its one step)
        replace = staticmethod(counted(os.replace))

        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

    monkeypatch.setattr(vehicle_identity, "write_atomic", counted(write_atomic))
    monkeypatch.setattr(vehicle_identity, "os", CountedOs())


def _matches(identity: ClientIdentity) -> bool:
    key = serialization.load_pem_private_key(identity.key_path.read_bytes(), PASSWORD.encode())
    cert = x509.load_pem_x509_certificate(identity.cert_path.read_bytes())
    return key.public_key() == cert.public_key()


@pytest.mark.parametrize("step", range(1, RENEWAL_STEPS + 2))
def test_a_renewal_cut_short_at_any_step_leaves_a_matching_pair(
    step: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, old_cert = _identity(tmp_path)
    with monkeypatch.context() as patch:
        _crashing_at(step, patch)
        with contextlib.suppress(SimulatedCrash):
            identity.renew(VIN, _issue)
    restarted = ClientIdentity(identity.cert_path, identity.key_path, PASSWORD.encode())
    restarted.finish_interrupted_renewal()
    assert _matches(restarted), f"key and certificate differ after a crash at step {step}"
    if step > 3:  # the new key replaced the old one: the new certificate must be in place
        assert restarted.cert_path.read_bytes() != old_cert
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["client.crt", "client.key"]


@pytest.mark.parametrize("step", [1, 2])
def test_a_recovery_cut_short_is_finished_by_the_next_start(
    step: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, old_cert = _identity(tmp_path)
    with monkeypatch.context() as patch:
        _crashing_at(RENEWAL_STEPS, patch)  # key renamed, certificate not yet
        with contextlib.suppress(SimulatedCrash):
            identity.renew(VIN, _issue)
    with monkeypatch.context() as patch:
        _crashing_at(step, patch)
        with contextlib.suppress(SimulatedCrash):
            identity.finish_interrupted_renewal()
    identity.finish_interrupted_renewal()
    assert _matches(identity) and identity.cert_path.read_bytes() != old_cert


def test_no_matching_pair_is_refused_not_used(tmp_path: Path) -> None:
    identity, _ = _identity(tmp_path)
    stranger, _ = _identity(tmp_path / "other")
    os.replace(stranger.key_path, identity.key_path.with_name("client.key.next"))
    identity.key_path.unlink()
    with pytest.raises(IdentityError, match="no key among"):
        identity.finish_interrupted_renewal()
