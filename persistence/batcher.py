"""Size-or-time batching: a batch is due when it holds `size` items or its oldest waited `timeout_s`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, size: int, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError("batch size must be at least 1")
        self.size = size
        self.timeout_s = timeout_s
        self.clock = clock
        self._items: list[T] = []
        self._since: float | None = None  # when the oldest pending item arrived

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        if not self._items:
            self._since = self.clock()
        self._items.append(item)

    def items(self) -> list[T]:
        """The pending items, oldest first (a copy)."""
        return list(self._items)

    def room(self) -> int:
        """How many items fit before the batch is full (what to ask the consumer for)."""
        return max(self.size - len(self._items), 0)

    def wait_s(self) -> float:
        """How long to wait for more items before the pending batch is due."""
        if self._since is None:
            return self.timeout_s
        return max(self._since + self.timeout_s - self.clock(), 0.0)

    def due(self) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self.size or self.wait_s() <= 0

    def take(self) -> list[T]:
        """The next batch (at most `size` items, oldest first); the rest stays pending."""
        batch, self._items = self._items[: self.size], self._items[self.size :]
        self._since = self.clock() if self._items else None
        return batch

    def drop(self, unwanted: Callable[[T], bool]) -> int:
        """Forget pending items (e.g. of partitions revoked in a rebalance); returns how many."""
        kept = [i for i in self._items if not unwanted(i)]
        dropped = len(self._items) - len(kept)
        self._items = kept
        if not kept:
            self._since = None
        return dropped
