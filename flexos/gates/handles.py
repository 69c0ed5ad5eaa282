"""Handle tables: which local objects a peer holds, and which peer objects we hold proxies for.

Lifetimes use distributed reference counting. The owner counts every time it sends a handle; the
holder counts every time it receives it, and when its proxy dies sends back ``(handle, received)``.
The owner drops the object when its count reaches zero, which stays correct when a handle is sent
again while a release for it is still in flight.

A compartment holds at most :data:`MAX_HANDLES` of this side's objects at a time: past that, what
would hand it one more fails with :class:`TooManyHandles` (its own call, or the app's call that
passes it an object), and nothing else of this side is affected.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any

from flexos.errors import GateError, ProtocolError

# How many of this side's objects one compartment may hold at a time (not counting classes).
MAX_HANDLES = 100_000


class TooManyHandles(GateError):
    """A compartment holds as many of this side's objects as it may: it must let some go first."""


class ExportTable:
    """Local objects the peer may name by handle. Handles are stable while the object is held.

    ``limit``: how many objects the peer may hold at once (None: no bound, for the app, the
    principal). Pinned handles (classes, which peers mirror for good) are outside the bound and
    never released by the peer.
    """

    def __init__(self, holder: str = "the peer", limit: int | None = MAX_HANDLES) -> None:
        self._lock = threading.Lock()
        self.objects: dict[int, list[Any]] = {}  # handle -> [object, count]
        self._handles: dict[int, int] = {}  # id(object) -> handle
        self._pinned: set[int] = set()
        self._next = 1
        self.holder = holder
        self.limit = limit

    def export(self, obj: Any) -> int:
        with self._lock:
            handle = self._handles.get(id(obj))
            if handle is not None:
                self.objects[handle][1] += 1
                return handle
            held = len(self.objects) - len(self._pinned)
            if self.limit is not None and held >= self.limit:
                raise TooManyHandles(
                    f"{self.holder} holds {held} objects of this compartment, as many as it may (the bound is "
                    f"{self.limit}); it must let some go before it is handed more"
                )
            handle = self._next
            self._next += 1
            self.objects[handle] = [obj, 1]
            self._handles[id(obj)] = handle
            return handle

    def pin(self, obj: Any) -> int:
        """A handle for ``obj`` that stays until the table is cleared, outside the bound (the
        caller dedupes: classes, which are as many as this side has)."""
        with self._lock:
            handle = self._next
            self._next += 1
            self.objects[handle] = [obj, 1]
            self._pinned.add(handle)
            return handle

    def get(self, handle: int) -> Any:
        entry = self.objects.get(handle)
        if entry is None:
            raise ProtocolError(f"compartment named handle {handle}, which it does not hold")
        return entry[0]

    def release(self, releases: list[list[int]]) -> None:
        with self._lock:
            for handle, count in releases:
                entry = self.objects.get(handle)
                if entry is None or handle in self._pinned:
                    continue  # a confused or hostile peer: releasing twice must not hurt us
                entry[1] -= count
                if entry[1] <= 0:
                    del self.objects[handle]
                    del self._handles[id(entry[0])]

    def __len__(self) -> int:
        return len(self.objects)

    def clear(self) -> None:
        with self._lock:
            self.objects.clear()
            self._handles.clear()
            self._pinned.clear()


class _ProxyRef(weakref.ref):
    """A weak reference to a proxy, with the peer's handle and how many times we received it."""

    __slots__ = ("count", "handle")
    count: int
    handle: int


class _Anchor:
    """What a value proxy is weakly referenced through (``int``, ``bytes`` and ``tuple``
    subclasses cannot be): it and the proxy hold each other, so it dies with the proxy, when the
    cyclic garbage collector finds them unreachable."""

    __slots__ = ("__weakref__", "proxy")

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy


class ImportTable:
    """Proxies of peer objects, one live proxy per handle, so identity survives the gate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, _ProxyRef] = {}
        # Weakref callbacks may run inside any allocation (even while _lock is held), so they
        # only append here; releases are computed when the next frame is sent.
        self._dead: collections.deque[_ProxyRef] = collections.deque()
        self.dying = self._dead  # truthy when releases are waiting to be sent

    def peek(self, handle: int) -> Any:
        """Our live proxy of ``handle``, or None: to name it in a message, never to count it."""
        ref = self._refs.get(handle)
        return ref() if ref is not None else None

    def lookup_or_create(self, handle: int, create: Callable[..., Any], *args: Any) -> Any:
        """Our live proxy of ``handle`` (counting one more receipt), else ``create(*args)``'s."""
        with self._lock:
            ref = self._refs.get(handle)
            if ref is not None:
                proxy = ref()
                if proxy is not None:
                    ref.count += 1
                    # (an anchor if the peer named this handle as a value before: its proxy)
                    return proxy.proxy if type(proxy) is _Anchor else proxy
            proxy = create(*args)
            ref = _ProxyRef(proxy, self._dead.append)
            ref.handle = handle
            ref.count = 1
            self._refs[handle] = ref
            return proxy

    def lookup_or_create_value(self, handle: int, create: Callable[[], Any]) -> Any:
        """:meth:`lookup_or_create` for value proxies. Those of ``str``, ``float`` and ``complex``
        subclasses are referenced directly, so they die when their last reference goes, as the
        library's own value would; ``int``, ``bytes`` and ``tuple`` subclasses refuse weak
        references, so theirs go through an anchor, and die when the cyclic collector runs."""
        with self._lock:
            ref = self._refs.get(handle)
            if ref is not None:
                target = ref()
                if target is not None:
                    ref.count += 1
                    return target.proxy if type(target) is _Anchor else target
            proxy = create()
            if type(proxy).__weakrefoffset__:
                target = proxy
            else:
                target = proxy.__dict__["_flexos_anchor"] = _Anchor(proxy)
            ref = _ProxyRef(target, self._dead.append)
            ref.handle = handle
            ref.count = 1
            self._refs[handle] = ref
            return proxy

    def take_releases(self) -> list[list[int]]:
        """Release records for proxies that died since the last call."""
        if not self._dead:
            return []
        releases = []
        with self._lock:
            while self._dead:
                ref = self._dead.popleft()
                if self._refs.get(ref.handle) is ref:
                    del self._refs[ref.handle]
                releases.append([ref.handle, ref.count])
        return releases

    def __len__(self) -> int:
        return len(self._refs)
