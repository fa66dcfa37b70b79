"""The progress event and the broadcast to sinks."""

import json

import pytest

from nova_xen_ncm.progress import Broadcast
from nova_xen_ncm.progress import EventKind
from nova_xen_ncm.progress import ProgressEvent
from nova_xen_ncm.progress import ProgressSink


class Recorder:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


def event(**kw):
    base = dict(
        migration_id="m",
        kind=EventKind.RETRY,
        phase="precopy",
        timestamp=1.5,
    )
    base.update(kw)
    return ProgressEvent(**base)


def test_event_type_names_the_kind():
    assert event().event_type == "xen_ncm.migration.retry"
    assert event(kind=EventKind.STATE).event_type == (
        "xen_ncm.migration.state"
    )


def test_to_dict_is_json_serialisable():
    ev = event(memory_total=10, memory_remaining=4, detail={"attempt": 2})
    payload = json.loads(json.dumps(ev.to_dict()))
    assert payload["memory_total"] == 10
    assert payload["memory_remaining"] == 4
    assert payload["detail"] == {"attempt": 2}
    assert payload["kind"] == "retry"


def test_event_is_immutable():
    with pytest.raises(AttributeError):
        event().phase = "done"


def test_recorder_is_a_sink():
    assert isinstance(Recorder(), ProgressSink)


def test_broadcast_order_and_failure_isolation():
    calls = []

    class Broken:
        def emit(self, ev):
            calls.append("broken")
            raise ValueError("sink failure")

    first, last = Recorder(), Recorder()
    bus = Broadcast([first, Broken()])
    bus.add(last)
    ev = event()
    bus.emit(ev)
    assert first.events == [ev]
    assert last.events == [ev]
    assert calls == ["broken"]
    bus.remove(first)
    assert len(bus) == 2
