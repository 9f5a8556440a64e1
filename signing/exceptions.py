"""The root of Uptake's exceptions, and what a refusal means for a vehicle.

Every error Uptake raises on purpose derives from :class:`UptakeError`, so a
caller that wants "anything Uptake refused" catches one class; anything else
that escapes is a bug. Like ``tuf.api.exceptions``, the classes say *what
failed*, and the three vehicle-side classes below say *what it means*:

* :class:`AttackDetected`: evidence of an attack. The vehicle refuses, keeps
  what it runs, and reports it in the next manifest's ``attacks_detected``;
* :class:`TransientFailure`: the network or the server failed. The update is
  postponed to the next poll (a partial download resumes);
* :class:`ConfigurationFailure`: a provisioning or deployment mistake (a
  trusted root of another deployment, a VIN the server does not know, a
  redirect to another origin). Refused and reported as a failure, never as an
  attack.

The tree (each class lives next to the code that raises it)::

    UptakeError
    ├── VerificationFailure                    here
    │   ├── AttackDetected                     here
    │   │   ├── DecryptionFailure              client.decryption
    │   │   └── PartialVerificationError       client.partial_verification
    │   ├── TransientFailure                   here
    │   └── ConfigurationFailure               here
    ├── InvalidNameError (ValueError)          signing.names
    │   └── PathEscapeError                    signing.names
    ├── UntrustedJsonError (ValueError)        signing.json_limits
    ├── MetadataFormatError                    signing.metadata
    ├── ManifestError                          signing.manifest
    │   ├── ManifestFormatError
    │   └── ManifestSignatureError
    ├── KeyFileError                           signing.keys
    ├── EncryptionFormatError, DecryptionError signing.encryption
    ├── DeltaFormatError (ValueError)          signing.delta_format
    ├── AgentConfigError                       client.config
    ├── StateError                             client.state
    ├── BootEnvironmentError                   client.bootenv
    ├── InstallError                           client.installer
    ├── ProvisioningError                      client.provisioning
    ├── SecondaryError                         client.secondaries.base
    ├── MetadataBundleError (ValueError)       client.secondaries.metadata_bundle
    ├── FlashError and its steps               client.secondaries.flashing
    ├── DeltaError and its kinds               client.delta_apply
    ├── BenchFileError, BenchError             hil.bench_file, hil.runner
    └── FirmwareInfoError                      uptake.firmware_info

python-tuf's own errors (``RepositoryError``, ``DownloadError``) stay what
they are; :func:`client.verification.classify` is the one place that says
what each means for the vehicle.
"""

from __future__ import annotations

__all__ = [
    "AttackDetected",
    "ConfigurationFailure",
    "TransientFailure",
    "UptakeError",
    "VerificationFailure",
]


class UptakeError(Exception):
    """Base class of every error Uptake raises on purpose."""


class VerificationFailure(UptakeError):
    """Verification, or a verified download, did not succeed; the subclass says what it means."""


class AttackDetected(VerificationFailure):
    """Evidence of an attack: refused, and reported in the next manifest's ``attacks_detected``."""


class TransientFailure(VerificationFailure):
    """The network or the server failed: the update is postponed to the next poll."""


class ConfigurationFailure(VerificationFailure):
    """A provisioning or deployment mistake: refused and reported as a failure, not an attack."""
