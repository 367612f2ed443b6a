"""Sets whose members expire and windows that close by themselves: time spent as data, bounded."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class ExpiringSet:
    """Members live `ttl` seconds; past `max_items` the oldest go first."""

    def __init__(self, ttl: float, max_items: int, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_items, self.clock = ttl, max_items, clock
        self._until: OrderedDict[Hashable, float] = OrderedDict()

    def add(self, key: Hashable) -> None:
        self._until.pop(key, None)
        self._until[key] = self.clock() + self.ttl
        while len(self._until) > self.max_items:
            self._until.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        now = self.clock()
        while self._until and next(iter(self._until.values())) <= now:  # insertion order = expiry order
            self._until.popitem(last=False)
        return len(self._until)

    def discard(self, key: Hashable) -> None:
        self._until.pop(key, None)


class Window:
    """True for `seconds` after `open()` (a failure seen, a scan done), then false by itself."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self._until = float("-inf")

    def open(self) -> None:
        self._until = self.clock() + self.seconds

    def close(self) -> None:
        self._until = float("-inf")

    def __bool__(self) -> bool:
        return self.clock() < self._until
