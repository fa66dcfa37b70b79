"""The fixed part of the pause, measured on the migrations done.

A pause is the transfer of the pages left plus a part that does not
depend on them: pausing, the platform and PV state, the destination's
restore and digests, the commit's round trips and syncs. The ``downtime``
policy takes that part off its target ([xen_ncm] switchover_estimate),
but nothing before the pause can time it. What can: each migration that
ended knows its downtime and the transfer its policy expected when it
stopped; the difference is the fixed part between these two hosts, and
the next migration to the same destination starts from it.

The pages left cost more in the pause than in precopy: they are few and
scattered, and each end reads and digests the blocks around each of
them. So the history keeps a second number, the cost of a page in the
pause: once a fixed part is known, a pause that sent
:data:`PAGE_SAMPLE_MIN` pages or more is not taken for one (were its
pages' cost underestimated, the fixed part would grow with it); the
downtime less the fixed part known, over its pages, is a page's cost,
which the policy then counts for each page left, when that is more than
the precopy's pace says.

A :class:`SwitchoverHistory` belongs to whoever starts the migrations (a
compute host's live-migration operations, a benchmark): one migration's
statistics stay its own (stats.py), the history only keeps these two
numbers.
"""

from __future__ import annotations

import collections
import collections.abc
import threading

#: Migrations per destination remembered: the estimate is the second
#: longest of their fixed parts (:func:`high`), so that neither one quick
#: pause on an idle moment nor one stalled on a loaded one decides the
#: next migration's.
WINDOW = 5

#: Destinations remembered, those recorded last: a compute host sends to
#: the hosts of its cloud, but a long-lived service must not grow with
#: every address it ever sent to.
DESTINATIONS = 1024

#: Fixed parts measured before the estimate is used: with fewer, one
#: pause stalled by a reconnection or a loaded moment would be the
#: estimate and throttle the next migrations for nothing; with three,
#: one such pause is not the second longest.
SAMPLES = 3


def high(values: collections.abc.Iterable[float]) -> float:
    """The second largest of ``values`` (the only one if alone): of five
    the 80th percentile. A pause is longer than the estimate of its fixed
    part about as often as the estimate is exceeded in the history, so a
    median would be exceeded by half the pauses; the largest would let
    one stalled pause decide."""
    ordered = sorted(values)
    return ordered[-2] if len(ordered) > 1 else ordered[0]


#: Fewest pages a pause must have sent for its page cost to be measured
#: (with fewer, the noise of the fixed part is most of the quotient);
#: a pause with fewer measures the fixed part.
PAGE_SAMPLE_MIN = 512


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
        # Seconds per page in the pause, per destination (same window).
        self._costs: dict[str, collections.deque[float]] = {}
        # Refusals not yet applied to the fixed parts, per destination:
        # the downtime target of each (None: any), for which and for
        # shorter ones it forgets the longest fixed part.
        self._refusals: dict[str, list[float | None]] = {}

    def record(
        self,
        destination: str,
        downtime: float,
        transfer: float,
        pages: int = 0,
        fixed_floor: float = 0.0,
    ) -> float | None:
        """A migration to ``destination`` paused the guest ``downtime``
        seconds to send ``pages`` pages, for which its policy expected
        ``transfer``. With :data:`PAGE_SAMPLE_MIN` pages or more and a
        fixed part known, the pause gives the cost of a page in the
        pause (:meth:`page_cost`), and None is returned. Else it gives a
        fixed part, the downtime less the expected transfer, returned;
        but a transfer expected to take the whole pause or more tells
        nothing of it (the estimate was high, as it is meant to be when
        it errs): None. ``fixed_floor`` is the fixed part the
        migration's policy counted when more than this history's (an
        operator's switchover_estimate): a page's cost is what the pause
        took beyond it, not beyond a shorter fixed part, which would
        count the difference twice in the next pauses expected."""
        if downtime < 0 or transfer < 0 or pages < 0:
            raise ValueError(
                f"downtime {downtime}, transfer {transfer} and pages "
                f"{pages} must not be negative"
            )
        with self._lock:
            fixed = self._fixed(destination)
            if fixed is not None:
                fixed = max(fixed, fixed_floor)
            if pages >= PAGE_SAMPLE_MIN and fixed is not None:
                if downtime > fixed:
                    self._remember(self._costs, destination).append(
                        (downtime - fixed) / pages
                    )
                return None
            if transfer >= downtime:
                return None
            part = downtime - transfer
            window = self._remember(self._seen, destination)
            # A pause measured: the refusals before it now apply to all
            # targets, but leave the estimate this pause and the shortest
            # before it: forgetting all of them left the next migration,
            # whatever its target, counting no fixed part at all.
            keep = min(SAMPLES, self._window) - 1
            refusals = len(self._refusals.pop(destination, ()))
            for _ in range(min(refusals, max(0, len(window) - keep))):
                window.remove(max(window))
            window.append(part)
        return part

    def _remember(
        self, table: dict[str, collections.deque[float]], destination: str
    ) -> collections.deque[float]:
        """The window of ``destination`` in ``table``, made the most
        recent; the least recent destination is forgotten past
        ``destinations`` (both tables alike)."""
        seen = self._seen.setdefault(
            destination, collections.deque(maxlen=self._window)
        )
        self._seen.move_to_end(destination)
        while len(self._seen) > self._destinations:
            gone, _ = self._seen.popitem(last=False)
            self._costs.pop(gone, None)
            self._refusals.pop(gone, None)
        if table is self._seen:
            return seen
        return table.setdefault(
            destination, collections.deque(maxlen=self._window)
        )

    def _fixed(
        self, destination: str, target: float | None = None
    ) -> float | None:
        seen = self._seen.get(destination)
        if not seen or len(seen) < min(SAMPLES, self._window):
            return None
        refusals = self._refusals.get(destination, ())
        forgotten = sum(
            1
            for refused in refusals
            if target is None or refused is None or target <= refused
        )
        kept = sorted(seen)[: len(seen) - forgotten]
        if len(kept) < min(SAMPLES, self._window):
            return None
        return high(kept)

    def estimate(self, destination: str, target: float | None = None) -> float:
        """The fixed part of a pause to ``destination``: the second
        longest (:func:`high`) of the last ones measured, 0 while fewer
        than :data:`SAMPLES` (or the whole window, if smaller) were.

        Each refusal (:meth:`refused`) forgets the longest for a
        migration whose downtime ``target`` (seconds; None: any) is not
        longer than the refused one's: a target refused again and again
        ends counting none and measures the pause again, whatever made
        the pause too long; a longer target is not refused for it and
        keeps what was measured (refusals at a 10 ms target, for a fixed
        part of 18 ms, left a 50 ms target counting none at all, and
        pausing three times its target)."""
        with self._lock:
            fixed = self._fixed(destination, target)
        return 0.0 if fixed is None else fixed

    def refused(self, destination: str, target: float | None = None) -> None:
        """A migration to ``destination`` with a downtime ``target``
        (seconds; None: any) was refused for the pause this history made
        it expect: its longest fixed part (for that target and shorter
        ones, :meth:`estimate`) and its highest page cost are
        forgotten. A refused migration measures nothing, so without this
        the pauses of one loaded moment would refuse every later
        migration there for good; after a few refusals fewer than
        :data:`SAMPLES` fixed parts are left, and the next migration
        measures the pause again."""
        with self._lock:
            seen = self._seen.get(destination)
            if seen:
                refusals = self._refusals.setdefault(destination, [])
                refusals.append(target)
                # No more than the fixed parts known: a target's longest
                # kept, the others have forgotten all they could.
                refusals.sort(key=lambda t: float("inf") if t is None else t)
                del refusals[: max(0, len(refusals) - len(seen))]
            costs = self._costs.get(destination)
            if costs:
                costs.remove(max(costs))

    def page_cost(self, destination: str) -> float:
        """Seconds a page left costs in a pause to ``destination``: the
        second highest (:func:`high`) of the last ones measured, 0 while
        fewer than :data:`SAMPLES` (or the whole window, if smaller)
        were: as for the fixed part, one pause stalled by a reconnection
        would otherwise price every page of the next migrations, and
        have them refused."""
        with self._lock:
            costs = self._costs.get(destination)
            if not costs or len(costs) < min(SAMPLES, self._window):
                return 0.0
            return high(costs)
