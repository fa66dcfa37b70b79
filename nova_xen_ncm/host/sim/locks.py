"""The simulated host's locks, in the one order they may be taken.

A thread holding a lock may take only a lock that comes later in
:data:`ORDER`, or one it holds already if that one is re-entrant (the
host's and xenstored's locks are). Every one of them is taken through
:class:`OrderedLock` or :func:`ordered`, which raise
:class:`LockOrderError` when the order is broken or a lock that is not
re-entrant is taken again, so a test that runs the path finds the
mistake before it deadlocks.

- ``backend``: a dom0 backend's own lock (devices.Backend); a backend
  calls into the host (grant maps, event channels) with it held.
- ``digest``: a domain's memory digest cache (digest.MemoryDigest); a
  refresh asks the hypervisor which pages others may be writing.
- ``host``: the hypervisor's lock (hypervisor.Hypervisor.lock): the
  domain table, the domid allocator, the maptrack, port tables.
- ``xenstore``: xenstored's lock (xenstore.core.Xenstore).
- ``memory``: a domain's memory lock (its RAM, p2m, shared info and
  event channel bits: memory.GuestMemory.lock, Dom0.mem_lock).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

BACKEND = "backend"
DIGEST = "digest"
HOST = "host"
XENSTORE = "xenstore"
MEMORY = "memory"

ORDER: tuple[str, ...] = (BACKEND, DIGEST, HOST, XENSTORE, MEMORY)
RANK = {name: rank for rank, name in enumerate(ORDER)}

_held = threading.local()


class LockOrderError(AssertionError):
    """A lock was taken out of :data:`ORDER`."""


def held() -> tuple[str, ...]:
    """The names of the ordered locks this thread holds, outermost
    first."""
    return tuple(name for name, _ in getattr(_held, "stack", ()))


def check(name: str, key: object = None, reentrant: bool = True) -> None:
    """Raise LockOrderError if this thread may not take the lock
    ``name`` now (``key``: the lock object, whose re-entry is allowed if
    it is ``reentrant``, and would deadlock otherwise)."""
    rank = RANK[name]
    stack = getattr(_held, "stack", ())
    if key is not None and any(k is key for _, k in stack):
        if reentrant:
            return
        raise LockOrderError(
            f"lock {name!r} taken again by the thread holding it: it is "
            "not re-entrant"
        )
    for other, _ in stack:
        if RANK[other] >= rank:
            raise LockOrderError(
                f"lock {name!r} taken while holding {other!r}: the order "
                f"is {' -> '.join(ORDER)}"
            )


class OrderedLock:
    """A lock that is always taken through the order check: ``with``
    it as with the lock it wraps. ``reentrant`` says whether the thread
    holding it may take it again; it is given, not read from the lock's
    type, because a process that eventlet monkey-patches after this
    module was imported (Nova's services and tests do) makes RLocks of
    another type."""

    def __init__(
        self, name: str, lock: object | None = None, reentrant: bool = False
    ) -> None:
        if name not in RANK:
            raise ValueError(f"{name!r} is not one of {ORDER}")
        self.name = name
        self._lock = threading.Lock() if lock is None else lock
        self.reentrant = reentrant

    def __enter__(self) -> OrderedLock:
        check(self.name, self, self.reentrant)
        self._lock.acquire()
        _held.__dict__.setdefault("stack", []).append((self.name, self))
        return self

    def __exit__(self, *exc: object) -> None:
        _held.stack.pop()
        self._lock.release()


@contextlib.contextmanager
def ordered(
    name: str,
    lock: AbstractContextManager,
    key: object = None,
    reentrant: bool = False,
) -> Iterator[None]:
    """Take ``lock`` (a lock or a context manager that takes one) as the
    lock called ``name``, checking the order first. ``key`` identifies
    the lock for re-entry (``lock`` itself by default), allowed only if
    ``reentrant`` (the caller knows what it passed: see
    :class:`OrderedLock`)."""
    key = lock if key is None else key
    check(name, key, reentrant)
    stack = _held.__dict__.setdefault("stack", [])
    with lock:
        stack.append((name, key))
        try:
            yield
        finally:
            stack.pop()
