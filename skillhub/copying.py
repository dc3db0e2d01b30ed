"""Copying a file while hashing it: reflink (FICLONE) where the file system shares blocks, else
``copy_file_range``, else read/write; the sha256 is taken of the copy, in a helper thread, while the next chunk is
copied. And the content address of a staged copy, computed again from its bytes. Used by :mod:`skillhub.staging`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from skillhub import faultpoints

CHUNK = 8 << 20  # bytes per copy step: amortises the syscalls, small enough to overlap with hashing
FICLONE = 0x40049409  # _IOW(0x94, 9, int), <linux/fs.h>: share the source's blocks copy-on-write (a reflink)
# What a file system without reflinks or in-kernel copy answers: then the next, more general way is tried.
NO_FAST_COPY = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.EPERM,
                errno.ETXTBSY, errno.EISDIR}


def stat_sig(st: os.stat_result) -> tuple[int, ...]:
    """What says a file changed: mode, size, mtime, ctime, inode and device."""
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class Transient(Exception):
    """Keep the drop pending and log why (once); retry later."""


class Changed(Exception):
    """The drop changed while it was being read (FAULTS A6): wait for it to be stable again."""


def _copy_stream(src: int, dst: int, stop: threading.Event) -> str:
    """Copy the open file ``src`` into the empty file ``dst`` (opened for reading and writing) and return the sha256
    of what ``dst`` then holds; abandon on ``stop``.

    Hashing the copy, not the source, keeps the digest true to the staged bytes even if the dropper rewrites the
    source meanwhile (the caller then sees the source's signature change, FAULTS A6). Chunk k is hashed in a helper
    thread (hashlib and the copy calls release the GIL) while chunk k+1 is copied: sha256 (~1.6 GB/s) is the floor.
    """
    digest = hashlib.sha256()
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as x:
        if x.errno not in NO_FAST_COPY:
            raise
    else:  # a reflink: the blocks are shared copy-on-write, so a later write to the source leaves ours alone
        _hash_range(dst, 0, os.fstat(dst).st_size, digest, bytearray(CHUNK), stop)
        return digest.hexdigest()
    if (mapped := _copy_kernel_mapped(src, dst, os.fstat(src).st_size, digest, stop)) is not None:
        return mapped
    # No in-kernel copy here: read(2) and write(2), each chunk hashed from the buffer while the next is read.
    buffers = [bytearray(CHUNK) for _ in range(3)]
    pending: list[Future[None]] = []
    off, i = 0, 0
    with ThreadPoolExecutor(1, thread_name_prefix="skillhub-sha256") as pool:  # one worker: chunks hash in order
        try:
            while not stop.is_set():
                if len(pending) == len(buffers):
                    pending.pop(0).result()  # the task of three chunks ago is done: its buffer is free
                buf, i = buffers[i % len(buffers)], i + 1
                if not (n := os.preadv(src, [buf], off)):
                    break
                _write_all(dst, memoryview(buf)[:n], off)
                pending.append(pool.submit(digest.update, memoryview(buf)[:n]))
                off += n
                faultpoints.reach("staging_copy")
            else:
                raise Transient("stopping")
        finally:
            wait(pending)  # never leave the helper reading a buffer or a file we are about to drop
        for f in pending:
            f.result()
    return digest.hexdigest()


def _copy_kernel_mapped(src: int, dst: int, size: int, digest: Any, stop: threading.Event) -> str | None:
    """Copy ``size`` bytes inside the kernel into ``dst``, set to that size first, hashing each chunk through a
    mapping of our own copy (no read into a buffer: about a fifth faster than :func:`_hash_range`); ``None``, with
    nothing written, for an empty file or when the kernel cannot copy here (it refused, or answered 0 at offset 0,
    as some file systems do for data they cannot copy in the kernel: then read(2) decides where the file ends). Mapping ``dst`` is safe (FAULTS A6): it is our file,
    and nobody else can truncate it; the dropper's file is never mapped.

    :raises Changed: the source ended before ``size`` (it was truncated while copied).
    """
    if stop.is_set():
        raise Transient("stopping")
    if not size or not (first := _copy_chunk_kernel(src, dst, 0)):
        return None
    os.ftruncate(dst, size)  # the copy fills it; the mapping sees every chunk as soon as it is copied
    mapping = mmap.mmap(dst, size, prot=mmap.PROT_READ)
    view = memoryview(mapping)
    pending: list[Future[None]] = []
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="skillhub-sha256") as pool:  # one worker: in order
            try:
                pending.append(pool.submit(digest.update, view[:first]))
                off = first
                faultpoints.reach("staging_copy")
                while off < size:
                    if stop.is_set():
                        raise Transient("stopping")
                    n = os.copy_file_range(src, dst, min(CHUNK, size - off), off, off)
                    if not n:
                        raise Changed()  # the source is shorter than it was: truncated while we copied
                    pending.append(pool.submit(digest.update, view[off:off + n]))
                    off += n
                    faultpoints.reach("staging_copy")
            finally:
                wait(pending)  # never leave the helper reading the mapping we are about to close
            for f in pending:
                f.result()
    finally:
        view.release()
        mapping.close()
    return digest.hexdigest()


def _copy_chunk_kernel(src: int, dst: int, off: int) -> int | None:
    """Copy up to :data:`CHUNK` bytes at ``off`` inside the kernel; ``None`` when it cannot do that here."""
    try:
        return os.copy_file_range(src, dst, CHUNK, off, off)
    except OSError as x:
        if x.errno in NO_FAST_COPY:
            return None
        raise


def _write_all(fd: int, view: memoryview, off: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)


def _hash_range(fd: int, off: int, n: int, digest: Any, buf: bytearray, stop: threading.Event | None = None) -> None:
    """Feed ``n`` bytes of ``fd`` from ``off`` to ``digest``, reading them into ``buf``."""
    end = off + n
    while off < end:
        if stop is not None and stop.is_set():
            raise Transient("stopping")
        got = os.preadv(fd, [memoryview(buf)[:min(len(buf), end - off)]], off)
        if got == 0:
            raise Changed()  # our own copy shrank: only a bug of ours could do that, so read the drop again
        digest.update(memoryview(buf)[:got])
        off += got


def hash_file(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256 of our own file ``path`` (staged or taken: nobody else can truncate it, so mapping it is safe),
    read through a mapping (no copy into a buffer)."""
    digest, fd = hashlib.sha256(), os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not (size := os.fstat(fd).st_size):
            return digest.hexdigest()
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping, memoryview(mapping) as view:
            for off in range(0, size, CHUNK):
                if stop is not None and stop.is_set():
                    raise Transient("stopping")
                digest.update(view[off:off + CHUNK])
    finally:
        os.close(fd)
    return digest.hexdigest()


def staged_sha256(path: Path) -> str:
    """The content address of a staged copy, computed again from its bytes (a file, or a folder as :class:`Stager`
    names it: sha256 over sorted "relative name\\0file sha256\\n" lines of the files under it)."""
    if not path.is_dir():
        return hash_file(path)
    lines = sorted(f"{r}\0{hash_file(path / r)}\n" for r, st in _walk(path).items() if stat.S_ISREG(st.st_mode))
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _walk(root: Path) -> dict[str, os.stat_result]:
    """Everything under ``root`` by relative POSIX name, without following symlinks."""
    out: dict[str, os.stat_result] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for de in it:
                r = f"{rel}/{de.name}" if rel else de.name
                out[r] = de.stat(follow_symlinks=False)
                if stat.S_ISDIR(out[r].st_mode):
                    stack.append(r)
    return out
