"""Delta creation: try several methods, keep the smallest, bound memory and time.

Workflow of :func:`create_delta`:

1. Hash both images (the container header names base and result).
2. Images whose old side fits ``whole_limit`` are diffed in one piece; the
   candidates, run in parallel worker processes, are:

   * ``bsdiff`` — bsdiff4 over the whole images, each stream recompressed
     with the best of xz/bz2/zstd (skipped when the images hold long uniform
     runs, which make bsdiff crawl or crash);
   * ``windows`` with one window — the same with uniform runs taken out as
     fills (tried whenever there are such runs);
   * ``zstd-dict`` — zstd with the old image as raw-content dictionary and
     long-distance matching (``zstd --patch-from``), when base + result fit
     the applier's memory bound.

3. Larger images are cut into ``window_size`` windows, each diffed against at
   most ``base_budget`` old bytes chosen by :mod:`server.delta.plan`, on
   ``workers`` processes; each window keeps its smallest segment (bsdiff, and
   zstd-dict / zstd / stored when bsdiff does poorly). Memory is then about
   ``workers x 17 x base_budget`` whatever the image size.

4. When the images hold compressed streams that recompress exactly, or are
   executables of a known architecture, the same is done on *transformed*
   images (:mod:`server.delta.transforms`) and the ``transformed`` delta is a
   candidate too.

bsdiff sections are *compact* (varint control, any LZMA2 lc/lp/pb) and their
matches come from bsdiff4 or HDiffPatch, whichever encodes smaller. A worker
that crashes (bsdiff on pathological input) only loses its candidate, or, for
a window, has it re-encoded without bsdiff. The delta is written atomically to
``out_path`` in the thin container (format version 2).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import multiprocessing
import shutil
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from server.delta import encoders, matching, plan, transforms
from signing import delta_format as fmt
from signing.atomic_file import atomic_writer

DEFAULT_WHOLE_LIMIT = 64 << 20
DEFAULT_WINDOW_SIZE = 8 << 20
DEFAULT_BASE_BUDGET = 16 << 20
# bsdiff on images with more uniform blocks than this is left to "windows".
_UNIFORM_LIMIT = 1 << 20
# A window whose bsdiff segment exceeds this share of its data also tries zstd.
_POOR_RATIO = 0.25


class DeltaCreationError(Exception):
    """No delta could be created (unreadable input, every candidate failed)."""


@dataclass
class DeltaReport:
    """What :func:`create_delta` produced and what it tried."""

    method: str
    detail: str
    old_length: int
    new_length: int
    delta_length: int
    seconds: float
    candidates: dict[str, int] = field(default_factory=dict)
    windows: int = 1

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "detail": self.detail,
            "old_bytes": self.old_length,
            "new_bytes": self.new_length,
            "delta_bytes": self.delta_length,
            "ratio_to_new": round(self.delta_length / max(1, self.new_length), 5),
            "seconds": round(self.seconds, 3),
            "candidate_payload_bytes": self.candidates,
            "windows": self.windows,
        }


def create_delta(
    old_path: Path | str,
    new_path: Path | str,
    out_path: Path | str,
    *,
    workers: int = 2,
    whole_limit: int = DEFAULT_WHOLE_LIMIT,
    window_size: int = DEFAULT_WINDOW_SIZE,
    base_budget: int = DEFAULT_BASE_BUDGET,
    methods: Collection[str] | None = None,
    arch_hint: str | None = None,
    max_recompress_memory: int = fmt.MAX_RECOMPRESS_MEMORY,
) -> DeltaReport:
    """Write to ``out_path`` the smallest delta making ``new_path`` from ``old_path``.

    ``methods`` restricts the candidates (``bsdiff``, ``windows``, ``zstd-dict``,
    ``transformed``); by default every applicable one is tried. ``arch_hint``
    (``x86``, ``arm``, ``armt``, ``ppc``, ``sparc``) names the machine code of a
    raw image (ELF images say it themselves). ``max_recompress_memory`` bounds
    what a transformed delta may ask the vehicle's recompressors for.
    """
    known = {*WHOLE_METHODS, "transformed"}
    if methods is not None and not set(methods) <= known:
        raise DeltaCreationError(f"unknown methods {sorted(set(methods) - known)}")
    if arch_hint is not None and arch_hint not in transforms.ARCH_BY_NAME:
        raise DeltaCreationError(f"unknown architecture {arch_hint!r}")
    started = time.monotonic()
    if window_size <= 0 or window_size % plan.FILL_BLOCK:
        raise DeltaCreationError(f"window size must be a positive multiple of {plan.FILL_BLOCK}")
    try:
        old_length, old_sha = _file_digest(old_path)
        new_length, new_sha = _file_digest(new_path)
    except OSError as exc:
        raise DeltaCreationError(f"cannot read image: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="uptake-delta-") as tmp:
        work = Path(tmp)
        plain = [m for m in methods if m != "transformed"] if methods is not None else None
        best: _Candidate | None = None
        candidates: dict[str, int] = {}
        if plain is None or plain:
            best = _create_plain(
                Path(old_path),
                Path(new_path),
                old_length,
                new_length,
                work / "plain",
                workers=workers,
                whole_limit=whole_limit,
                window_size=window_size,
                base_budget=base_budget,
                methods=plain,
            )
            candidates.update(best.candidates)
        if methods is None or "transformed" in methods:
            for candidate in _create_transformed(
                Path(old_path),
                Path(new_path),
                old_length,
                new_length,
                work,
                workers=workers,
                whole_limit=whole_limit,
                window_size=window_size,
                base_budget=base_budget,
                arch_hint=arch_hint,
                max_recompress_memory=max_recompress_memory,
            ):
                candidates[candidate.detail] = candidate.size
                if best is None or candidate.size < best.size:
                    best = candidate
        if best is None:
            raise DeltaCreationError("no transform applies to these images")
        header = fmt.thin_header(
            best.method, (old_length, old_sha), (new_length, new_sha), best.size
        )
        encoded = header.encode()
        crc = zlib.crc32(encoded)
        with atomic_writer(out_path) as out, open(best.payload, "rb") as payload:
            out.write(encoded)
            while chunk := payload.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
                out.write(chunk)
            out.write(fmt.crc_trailer(crc))
    return DeltaReport(
        method=best.method,
        detail=best.detail,
        old_length=old_length,
        new_length=new_length,
        delta_length=len(encoded) + best.size + header.trailer_length,
        seconds=time.monotonic() - started,
        candidates=candidates,
        windows=best.windows,
    )


@dataclass
class _Candidate:
    """One payload, in a file: ``method`` is the container's method name."""

    method: str
    payload: Path
    size: int
    detail: str
    candidates: dict[str, int]
    windows: int


def _create_plain(
    old_path: Path,
    new_path: Path,
    old_length: int,
    new_length: int,
    payload_path: Path,
    *,
    workers: int,
    whole_limit: int,
    window_size: int,
    base_budget: int,
    methods: Collection[str] | None,
) -> _Candidate:
    """The smallest bsdiff / zstd-dict / windows payload, written to ``payload_path``."""
    with open(payload_path, "wb") as payload:
        if old_length <= whole_limit:
            method, data, detail, candidates, windows = _create_whole(
                old_path, new_path, old_length, new_length, workers, methods
            )
            payload.write(data)
            del data
        else:
            method = "windows"
            detail, windows = _create_windowed(
                old_path,
                new_path,
                old_length,
                new_length,
                workers,
                window_size,
                base_budget,
                payload,
            )
            candidates = {"windows": payload.tell()}
        size = payload.tell()
    return _Candidate(method, payload_path, size, detail, candidates, windows)


def _create_transformed(
    old_path: Path,
    new_path: Path,
    old_length: int,
    new_length: int,
    work: Path,
    *,
    workers: int,
    whole_limit: int,
    window_size: int,
    base_budget: int,
    arch_hint: str | None,
    max_recompress_memory: int,
) -> list[_Candidate]:
    """A ``transformed`` payload per applicable transform plan (images up to ``whole_limit``)."""
    if max(old_length, new_length) > max(whole_limit, DEFAULT_WHOLE_LIMIT):
        return []  # filesystem images: their windows already find moved files
    old = old_path.read_bytes()
    new = new_path.read_bytes()
    results = []
    for number, transform in enumerate(transforms.plan_transforms(old, new, arch_hint)):
        if transforms.recompress_memory(transform) > max_recompress_memory:
            continue
        directory = work / f"transform-{number}"
        directory.mkdir()
        old_t, new_t = transforms.transformed_files(transform, old, new, directory)
        inner = _create_plain(
            old_t,
            new_t,
            old_t.stat().st_size,
            new_t.stat().st_size,
            directory / "inner",
            workers=workers,
            whole_limit=whole_limit,
            window_size=window_size,
            base_budget=base_budget,
            methods=None,
        )
        old_t.unlink()
        new_t.unlink()
        payload = directory / "payload"
        with open(payload, "wb") as out, open(inner.payload, "rb") as inner_payload:
            out.write(transform.encode_maps(old_length, new_length))
            out.write(bytes([fmt.METHOD_IDS[inner.method]]))
            shutil.copyfileobj(inner_payload, out, 1 << 20)
            size = out.tell()
        inner.payload.unlink()
        results.append(
            _Candidate(
                "transformed",
                payload,
                size,
                f"{transform.name}, then {inner.detail}",
                {},
                inner.windows,
            )
        )
    return results


def _file_digest(path: Path | str) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.digest()


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # fork starts workers instantly, but forking a threaded process (a web
    # server calling us from an executor) can deadlock: spawn then.
    method = "fork" if threading.active_count() == 1 else "spawn"
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, workers), mp_context=multiprocessing.get_context(method)
    )


# --- whole images ---------------------------------------------------------------


def _candidate_bsdiff(old_path: Path, new_path: Path) -> tuple[bytes, str]:
    section = encoders.compact_section(old_path.read_bytes(), new_path.read_bytes())
    return section, f"bsdiff streams {encoders.compact_section_codecs(section)}"


def _candidate_hdiffpatch(old_path: Path, new_path: Path) -> tuple[bytes, str]:
    # Images with long uniform runs: bsdiff4 crawls on them, HDiffPatch does not.
    section = encoders.compact_section(
        old_path.read_bytes(), new_path.read_bytes(), use_bsdiff=False
    )
    return section, f"HDiffPatch matches, streams {encoders.compact_section_codecs(section)}"


def _candidate_zstd_dict(old_path: Path, new_path: Path) -> tuple[bytes, str]:
    frame = encoders.zstd_dict_frame(old_path.read_bytes(), new_path.read_bytes(), level=19)
    return frame, "zstd -19 with the old image as dictionary, long matching"


def _candidate_one_window(old_path: Path, new_path: Path) -> tuple[bytes, str]:
    new_length = new_path.stat().st_size
    old_length = old_path.stat().st_size
    window = plan.WindowPlan(0, new_length, [(0, old_length)] if old_length else [])
    encoded, segment = _encode_window(old_path, new_path, window, encoders.ALL_CODECS)
    return fmt.WINDOW_COUNT.pack(1) + encoded, f"1 window, {segment}, uniform runs as fills"


def _uniform_bytes(path: Path) -> int:
    with open(path, "rb") as stream:
        total = 0
        offset = 0
        while chunk := stream.read(8 << 20):
            total += sum(length for _, length, _ in plan.find_fills(chunk, offset))
            offset += len(chunk)
    return total


def _create_whole(
    old_path: Path,
    new_path: Path,
    old_length: int,
    new_length: int,
    workers: int,
    methods: Collection[str] | None,
) -> tuple[str, bytes, str, dict[str, int], int]:
    uniform = _uniform_bytes(old_path) + _uniform_bytes(new_path)
    jobs: dict[str, Callable[[Path, Path], tuple[bytes, str]]] = {}
    small = old_length + new_length <= (8 << 20)
    dict_fits = old_length <= fmt.MAX_DICT_BASE and old_length + new_length <= fmt.MAX_DICT_TOTAL
    if methods is None:
        # Plain bsdiff crawls on long uniform runs: leave those to "windows".
        if uniform <= _UNIFORM_LIMIT:
            jobs["bsdiff"] = _candidate_bsdiff
        elif matching.hdiffpatch_available():
            jobs["bsdiff"] = _candidate_hdiffpatch
        if uniform > _UNIFORM_LIMIT or (uniform and small) or "bsdiff" not in jobs:
            jobs["windows"] = _candidate_one_window
        if dict_fits:
            jobs["zstd-dict"] = _candidate_zstd_dict
    else:
        if "zstd-dict" in methods and not dict_fits:
            raise DeltaCreationError("zstd-dict needs old + new within the applier's memory bound")
        jobs = {name: WHOLE_METHODS[name] for name in methods}
    results: dict[str, tuple[bytes, str]] = {}
    errors: dict[str, str] = {}
    with _pool(min(workers, len(jobs))) as pool:
        futures = {pool.submit(job, old_path, new_path): name for name, job in jobs.items()}
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            try:
                results[name] = future.result()
            except Exception as exc:  # a crashed worker loses only its candidate
                errors[name] = f"{type(exc).__name__}: {exc}"
    if not results:
        raise DeltaCreationError(f"every delta method failed: {errors}")
    method = min(results, key=lambda name: len(results[name][0]))
    payload, detail = results[method]
    candidates = {name: len(data) for name, (data, _) in results.items()}
    return method, payload, detail, candidates, 1


WHOLE_METHODS: dict[str, Callable[[Path, Path], tuple[bytes, str]]] = {
    "bsdiff": _candidate_bsdiff,
    "windows": _candidate_one_window,
    "zstd-dict": _candidate_zstd_dict,
}


# --- windowed images --------------------------------------------------------------


def _encode_window(
    old_path: Path,
    new_path: Path,
    window: plan.WindowPlan,
    codecs: tuple[int, ...],
    use_bsdiff: bool = True,
) -> tuple[bytes, str]:
    """One window in payload layout, and the name of the segment method chosen."""
    with open(new_path, "rb") as new:
        new.seek(window.new_offset)
        raw = new.read(window.new_length)
    fills = plan.find_fills(raw, window.new_offset)
    data = plan.strip_fills(raw, fills)
    del raw
    with open(old_path, "rb") as old:
        extents = plan.without_uniform(old, window.extents)
        base = plan.read_extents(old, extents)
    segments: dict[int, bytes] = {fmt.SEGMENT_STORED: data}
    if data:
        if use_bsdiff:
            segments[fmt.SEGMENT_BSDIFF] = encoders.compact_section(base, data, codecs)
        if not use_bsdiff or len(segments[fmt.SEGMENT_BSDIFF]) > _POOR_RATIO * len(data):
            if (
                base
                and len(base) <= fmt.MAX_DICT_BASE
                and (len(base) + len(data) <= fmt.MAX_DICT_TOTAL)
            ):
                segments[fmt.SEGMENT_ZSTD_DICT] = encoders.zstd_dict_frame(base, data)
            segments[fmt.SEGMENT_ZSTD] = encoders.zstd_frame(data)
    method = min(segments, key=lambda m: len(segments[m]))
    segment = segments[method]
    # Only bsdiff and zstd-dict segments read a base.
    used_extents = extents if method in (fmt.SEGMENT_BSDIFF, fmt.SEGMENT_ZSTD_DICT) else []
    out = io.BytesIO()
    out.write(fmt.WINDOW_LENGTH.pack(window.new_length))
    out.write(fmt.LIST_COUNT.pack(len(fills)))
    for fill in fills:
        out.write(fmt.FILL.pack(*fill))
    out.write(fmt.LIST_COUNT.pack(len(used_extents)))
    for extent in used_extents:
        out.write(fmt.EXTENT.pack(*extent))
    out.write(fmt.SEGMENT_HEAD.pack(method, len(segment)))
    out.write(segment)
    return out.getvalue(), fmt.SEGMENT_NAMES[method]


def _encode_window_job(
    args: tuple[Path, Path, plan.WindowPlan, tuple[int, ...]],
) -> tuple[bytes, str]:
    return _encode_window(*args)


def _create_windowed(
    old_path: Path,
    new_path: Path,
    old_length: int,
    new_length: int,
    workers: int,
    window_size: int,
    base_budget: int,
    payload: BinaryIO,
) -> tuple[str, int]:
    """Write the ``windows`` payload to ``payload``; return (detail, window count)."""
    with open(old_path, "rb") as old, open(new_path, "rb") as new:
        windows = plan.plan_windows(old, new, old_length, new_length, window_size, base_budget)
    jobs = [(old_path, new_path, window, encoders.FAST_CODECS) for window in windows]
    used: Counter[str] = Counter()
    payload.write(fmt.WINDOW_COUNT.pack(len(windows)))
    with _pool(workers) as pool:
        futures = [pool.submit(_encode_window_job, job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            try:
                encoded, segment = future.result()
            except Exception:
                # A crashed worker (bsdiff on pathological data) breaks the pool:
                # encode this window here, without bsdiff.
                encoded, segment = _encode_window(*job[:3], codecs=(), use_bsdiff=False)
            payload.write(encoded)
            used[segment] += 1
    detail = ", ".join(f"{count} {name}" for name, count in sorted(used.items()))
    return f"{len(windows)} windows of {window_size >> 20} MiB ({detail})", len(windows)
