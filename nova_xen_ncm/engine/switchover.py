"""The fixed part of the pause, measured on the migrations done.

A pause is the transfer of the pages left plus a part that does not
depend on them: pausing, the platform and PV state, the destination's
restore and digests, the commit's round trips and syncs. The ``downtime``
policy takes that part off its target ([xen_ncm] switchover_estimate),
but nothing before the pause can time it. What can: each migration that
ended knows its downtime and the transfer its policy expected when it
stopped; the difference is the fixed part between these two hosts, and
the next migration to the same destination starts from it.

A :class:`SwitchoverHistory` belongs to whoever starts the migrations (a
compute host's live-migration operations, a benchmark): one migration's
statistics stay its own (stats.py), the history only keeps this number.
"""

from __future__ import annotations

import collections
import statistics
import threading

#: Migrations per destination remembered: the estimate is the median
#: of their fixed parts, so that neither one quick pause on an idle
#: moment nor one stalled on a loaded one decides the next migration's.
WINDOW = 5

#: Destinations remembered, those recorded last: a compute host sends to
#: the hosts of its cloud, but a long-lived service must not grow with
#: every address it ever sent to.
DESTINATIONS = 1024

#: Fixed parts measured before the median is used: with fewer, one
#: pause stalled by a reconnection or a loaded moment would be the
#: estimate (or half of it) and throttle the next migrations for
#: nothing; with three, one such pause cannot move the median past the
#: other two.
SAMPLES = 3


class SwitchoverHistory:
    """The fixed part of the pause per destination host, in seconds."""

    def __init__(
        self, window: int = WINDOW, destinations: int = DESTINATIONS
    ) -> None:
        if window < 1:
            raise ValueError(f"window {window} must be at least 1")
        if destinations < 1:
            raise ValueError(f"destinations {destinations} must be at least 1")
        self._lock = threading.Lock()
        self._window = window
        self._destinations = destinations
        self._seen: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def record(
        self, destination: str, downtime: float, transfer: float
    ) -> float | None:
        """A migration to ``destination`` paused the guest ``downtime``
        seconds, of which its policy expected ``transfer`` for the pages
        left: remember the rest; returns it. A transfer expected to take
        the whole pause or more tells nothing of the fixed part (the
        estimate was high, as it is meant to be when it errs): nothing
        is remembered, and None returned."""
        if downtime < 0 or transfer < 0:
            raise ValueError(
                f"downtime {downtime} and transfer {transfer} must not be "
                "negative"
            )
        if transfer >= downtime:
            return None
        fixed = downtime - transfer
        with self._lock:
            seen = self._seen.setdefault(
                destination, collections.deque(maxlen=self._window)
            )
            seen.append(fixed)
            self._seen.move_to_end(destination)
            while len(self._seen) > self._destinations:
                self._seen.popitem(last=False)
        return fixed

    def estimate(self, destination: str) -> float:
        """The fixed part of a pause to ``destination``: the median of
        the last ones measured, 0 while fewer than :data:`SAMPLES` (or
        the whole window, if smaller) were."""
        with self._lock:
            seen = self._seen.get(destination)
            if not seen or len(seen) < min(SAMPLES, self._window):
                return 0.0
            return statistics.median(seen)
