"""The exceptions of the migration engine.

One base class, :class:`EngineError`, so that the orchestration and the
Nova driver translate engine failures once, at their boundary (the
compute-hyperv pattern). Subclasses say which layer failed: the phase
state machine, the wire protocol, the transport, a retry budget or the
policy registry.
"""

from __future__ import annotations


class EngineError(Exception):
    """A migration engine failure."""


class IllegalTransition(EngineError):
    """A phase change the transition table does not allow."""

    def __init__(self, old: object, new: object, current: object) -> None:
        self.old = old
        self.new = new
        self.current = current
        super().__init__(
            f"illegal migration state transition {old} -> {new} "
            f"(current state {current})"
        )


class StateConflict(IllegalTransition):
    """A compare-and-set transition lost: the state was no longer ``old``.

    Another thread changed the state first (QEMU's migrate_set_state
    semantics); the caller acts on the state it now finds.
    """

    def __init__(self, old: object, new: object, current: object) -> None:
        super().__init__(old, new, current)
        self.args = (
            f"state changed under transition {old} -> {new}: now {current}",
        )


class CancelRequested(StateConflict):
    """The migration was cancelled before it could enter COMMIT."""


class ProtocolError(EngineError):
    """The peer sent bytes that are not a valid message here."""


class AuthenticationError(ProtocolError):
    """A token proof, or the authentication tag of a frame, is wrong."""


class Refused(EngineError):
    """The destination refused: ``code`` is a RefuseReason value."""

    def __init__(self, code: str, text: str) -> None:
        # Plain string, also when given a RefuseReason member.
        self.code = str(getattr(code, "value", code))
        self.text = text
        super().__init__(f"refused ({self.code}): {text}")


class FeaturesChanged(EngineError):
    """The paused guest uses optional PV features that SETUP did not
    name (it started using them during pre-copy): the migration rolls
    back before anything of its state is exported, and the guest runs on
    where it was."""


class DevicesChanged(EngineError):
    """A PV device of the guest can no longer be carried (its frontend
    switched to several queues during pre-copy): found right before the
    pause, so the migration is abandoned with the guest never paused and
    running on where it was."""


class TransportError(EngineError):
    """A connection could not be made, or broke, or timed out.

    Retryable: the retry helper reconnects on it.
    """


class RetryExhausted(EngineError):
    """A retry budget ran out; ``__cause__`` is the last failure."""

    def __init__(
        self, what: str, attempts: int, elapsed: float, reason: str
    ) -> None:
        self.what = what
        self.attempts = attempts
        self.elapsed = elapsed
        super().__init__(
            f"{what}: gave up after {attempts} attempt(s) in "
            f"{elapsed:.3f}s ({reason})"
        )


class PolicyNotFound(EngineError):
    """No precopy policy is registered under that name."""


class MigrationAborted(EngineError):
    """The migration was cancelled (on this side, or by the peer's
    ABORT), or the policy gave up."""


class RemoteError(EngineError):
    """The destination reported a failure (ERROR or ABORT)."""


class DigestMismatch(EngineError):
    """The destination's guest-visible state differs from the source's."""
