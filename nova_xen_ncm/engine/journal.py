"""The source's journal of the migrations it has in flight.

A source engine that dies (a crash, SIGKILL, a host reboot of dom0's
toolstack) leaves its guest in whatever state the migration had put it:
paused, throttled, backends quiesced, log-dirty on, and possibly a COMMIT
on the wire. The journal keeps what a restarted engine needs to settle
each such migration (:mod:`nova_xen_ncm.engine.recovery`): the guest,
the destination and its one-time token (to ask it the commit query),
whether the guest ran before, and the phase, the commit decision
included.

One JSON file per migration under ``<[xen_ncm] state_path>/migrations``,
replaced atomically (write, fsync, rename) at every phase change, and
removed when the migration ends DONE, FAILED or CANCELLED. An IN_DOUBT
migration keeps its file until recovery settles it. The files hold a
token, so the directory is private to the service's user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent

LOG = logging.getLogger(__name__)

VERSION = 1
SUBDIR = "migrations"
SUFFIX = ".json"
# Migration ids become file names: nothing that could leave the directory.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The migration is over; nothing is left to settle.
_SETTLED = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})


# Fields an entry written by an earlier release may lack.
_OPTIONAL = frozenset({"uuid"})


class JournalError(EngineError):
    """The journal cannot be read or written."""


@dataclasses.dataclass
class Entry:
    """One source migration in flight."""

    migration_id: str
    domid: int
    #: The destination's endpoint, for the commit query.
    host: str
    port: int
    #: The one-time migration token (hex), which authenticates the query.
    token: str
    #: Whether the guest ran before the migration paused it.
    running: bool
    #: The phase the source last entered (a :class:`Phase` value).
    phase: str = Phase.SETUP.value
    #: Wall-clock time of the last update.
    updated: float = 0.0
    #: The guest's uuid: who the guest is once its domain is gone (a
    #: dom0 reboot). Empty in entries written before it was recorded.
    uuid: str = ""

    @property
    def token_bytes(self) -> bytes:
        return bytes.fromhex(self.token)

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Entry:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise JournalError(
                f"{where}: not a version {VERSION} journal entry"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        # Fields added since version 1 was written may be absent.
        missing = sorted(set(fields) - set(values) - set(_OPTIONAL))
        if missing:
            raise JournalError(f"{where}: missing {', '.join(missing)}")
        entry = cls(**values)
        try:
            Phase(entry.phase)
            entry.token_bytes  # noqa: B018 - validates the hex
        except ValueError as exc:
            raise JournalError(f"{where}: {exc}") from None
        if not isinstance(entry.domid, int) or not isinstance(entry.port, int):
            raise JournalError(f"{where}: domid and port must be integers")
        return entry


class Journal:
    """The journal kept under ``state_path``."""

    def __init__(self, state_path: str) -> None:
        self.path = os.path.join(state_path, SUBDIR)
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"cannot create the journal directory {self.path}: {exc}"
            ) from exc

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> Journal | None:
        """The journal of ``[xen_ncm] state_path``, None when unset."""
        path = conf.xen_ncm.state_path
        return cls(path) if path else None

    def _file(self, migration_id: str) -> str:
        if not _ID.match(migration_id):
            raise JournalError(
                f"migration id {migration_id!r} cannot name a journal entry"
            )
        return os.path.join(self.path, migration_id + SUFFIX)

    def write(self, entry: Entry) -> None:
        """Replace the entry's file atomically and durably."""
        entry.updated = time.time()
        path = self._file(entry.migration_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        data = json.dumps(entry.to_dict(), sort_keys=True).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_dir()
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise JournalError(
                f"cannot write journal entry {path}: {exc}"
            ) from exc

    def remove(self, migration_id: str) -> None:
        path = self._file(migration_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise JournalError(
                f"cannot remove journal entry {path}: {exc}"
            ) from exc
        self._sync_dir()

    def _sync_dir(self) -> None:
        # The rename or unlink is durable only once the directory is.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[Entry]:
        """Every migration in flight, oldest update first."""
        found = []
        for name in sorted(os.listdir(self.path)):
            if not name.endswith(SUFFIX):
                continue
            where = os.path.join(self.path, name)
            try:
                with open(where, "rb") as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                raise JournalError(f"{where}: unreadable: {exc}") from exc
            entry = Entry.from_dict(data, where)
            if entry.migration_id + SUFFIX != name:
                raise JournalError(
                    f"{where}: holds migration {entry.migration_id!r}"
                )
            found.append(entry)
        return sorted(found, key=lambda e: e.updated)


class JournalSink:
    """Keeps the journal entry of one source migration up to date.

    A progress sink on the migration's state (it sees every phase change
    as it happens, in order); :meth:`decide_commit` is called by the
    sender before COMMIT goes out and, unlike the sink, raises when the
    entry cannot be written, so that the migration rolls back rather than
    commit without a record of it.
    """

    def __init__(self, journal: Journal, entry: Entry) -> None:
        self.journal = journal
        self.entry = entry

    def decide_commit(self) -> None:
        self.entry.phase = Phase.COMMIT.value
        self.journal.write(self.entry)

    def emit(self, event: ProgressEvent) -> None:
        if event.kind is not EventKind.STATE:
            return
        phase = Phase(event.phase)
        if phase in _SETTLED:
            self.journal.remove(self.entry.migration_id)
            return
        if phase is Phase.PRECOPY:
            # From here the destination holds a domain and the source
            # turns log-dirty on: there is something to settle.
            self.entry.running = bool(
                event.detail.get("running", self.entry.running)
            )
        self.entry.phase = phase.value
        self.journal.write(self.entry)


def sink_from_conf(
    conf: cfg.ConfigOpts,
    migration_id: str,
    domid: int,
    endpoint: tuple[str, int],
    token: bytes,
    *,
    uuid: str = "",
) -> JournalSink | None:
    """The journal sink of a new source migration, None without
    ``[xen_ncm] state_path``."""
    journal = Journal.from_conf(conf)
    if journal is None:
        return None
    entry = Entry(
        migration_id=migration_id,
        domid=domid,
        host=endpoint[0],
        port=int(endpoint[1]),
        token=token.hex(),
        running=True,
        uuid=uuid,
    )
    # Refused now rather than at the first phase change.
    journal._file(migration_id)
    return JournalSink(journal, entry)
