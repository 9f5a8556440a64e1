"""Throughput and memory of per-ECU image encryption (signing/encryption.py).

Encrypts and decrypts an image of SIZE MiB (random bytes, in a temporary
file) with the director's and the agent's streaming code, and prints MiB/s
for each against the baseline measured in the same run: reading the file
and hashing it with SHA-256 (what every download costs anyway). Also prints
the peak Python heap during decryption (tracemalloc), which must stay about
one chunk whatever the image size.

    .venv/bin/python bench/encryption.py [--size-mib 64] [--chunk-kib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from signing.encryption import decrypt_stream, encrypt_stream, generate_encryption_key


class _Sink:
    def write(self, data: bytes, /) -> int:
        return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--chunk-kib", type=int, default=64)
    args = parser.parse_args()
    size, chunk = args.size_mib * 1024 * 1024, args.chunk_kib * 1024
    key = generate_encryption_key()
    with tempfile.TemporaryDirectory() as tmp:
        plain, cipher = Path(tmp) / "image.bin", Path(tmp) / "image.enc"
        with open(plain, "wb") as f:
            for _ in range(size // (1024 * 1024)):
                f.write(os.urandom(1024 * 1024))

        start = time.perf_counter()
        with open(plain, "rb") as f:
            hashlib.file_digest(f, "sha256")
        baseline = time.perf_counter() - start

        start = time.perf_counter()
        with open(plain, "rb") as src, open(cipher, "wb") as dst:
            info = encrypt_stream(src, dst, key.public_key(), size, chunk)
        encrypt = time.perf_counter() - start

        tracemalloc.start()
        start = time.perf_counter()
        with open(cipher, "rb") as src:
            decrypt_stream(src, _Sink(), key, info)
        decrypt = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    mib = size / (1024 * 1024)
    print(
        f"image {mib:.0f} MiB, chunk {args.chunk_kib} KiB, ciphertext overhead "
        f"{info.ciphertext_length - size} bytes ({(info.ciphertext_length - size) / size:.3%})"
    )
    print(f"baseline read + sha256: {mib / baseline:8.1f} MiB/s")
    print(
        f"encrypt (director):     {mib / encrypt:8.1f} MiB/s  ({encrypt / baseline:.2f}x the baseline's time)"
    )
    print(
        f"decrypt (agent):        {mib / decrypt:8.1f} MiB/s  ({decrypt / baseline:.2f}x the baseline's time)"
    )
    print(f"decrypt peak Python heap: {peak / 1024:.0f} KiB (chunk {args.chunk_kib} KiB)")


if __name__ == "__main__":
    main()
