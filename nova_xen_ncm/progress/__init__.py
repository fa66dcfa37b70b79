"""Progress of migrations: the event model and the sinks that report it.

The engine emits :class:`ProgressEvent` values to :class:`ProgressSink`
objects; see :mod:`nova_xen_ncm.progress.model`.
"""

from nova_xen_ncm.progress.model import Broadcast
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.model import ProgressSink

__all__ = ["Broadcast", "EventKind", "ProgressEvent", "ProgressSink"]
