"""At most one progress report per interval, per migration.

Only periodic progress is limited; the sinks send phase changes, retries,
errors and the end of a migration whatever the limiter says.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Hashable


class RateLimiter:
    """Allows one report per ``interval`` seconds for each key.

    The first report of a key is always allowed. Thread-safe.
    """

    def __init__(
        self,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError("a rate limit interval must not be negative")
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable) -> bool:
        """True, and the interval restarts, if ``key`` may report now."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return False
            self._last[key] = now
            return True

    def forget(self, key: Hashable) -> None:
        """Drop what is known of ``key`` (its migration ended)."""
        with self._lock:
            self._last.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._last)
