"""Uptake's shared core: keys, signers and the TUF/Uptane formats.

Both the server and the in-vehicle agent depend on this package, and on
nothing of each other. It holds:

* :mod:`signing.keys`: key generation, encrypted private-key files, public
  key files (ed25519 by default; ecdsa-p256 and rsa-pss accepted);
* :mod:`signing.metadata`: the Uptane-specific parts of TUF metadata
  (``custom`` fields of image and director targets, the director's VIN,
  the ``requires`` of images on other ECUs and the compatibility check),
  built on ``tuf.api.metadata``;
* :mod:`signing.manifest`: ECU version reports and vehicle version
  manifests, their signing and strict parsing;
* :mod:`signing.encryption`: per-ECU image encryption (X25519 + HKDF +
  AES-256-GCM, streamed) and its director ``custom`` field;
* :mod:`signing.delta_format`: the container around binary deltas;
* :mod:`signing.branch_filters`: the BCJ filters a ``transformed`` delta
  applies to machine code (ARM64 among them);
* :mod:`signing.compressor_versions`: the compressor library and version
  a transformed delta's streams are recompressed with;
* :mod:`signing.atomic_file`: crash-safe file replacement.
"""
