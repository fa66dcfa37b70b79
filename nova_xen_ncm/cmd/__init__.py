"""Console entry points of nova-xen-ncm.

Exit statuses shared by every command (``nova-xen-ncm --help`` lists
them): 0 success, 1 the operation ran and failed (a migration rolled
back, a check failed), 2 a mistake on the command line, 3 a
configuration file that cannot be used, 4 an environment problem (an
address that cannot be bound, a message bus driver that is not
installed, not enough memory), 130 and 143 interrupted by SIGINT or
SIGTERM.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_ENVIRONMENT = 4


class CommandError(Exception):
    """An error the user can act on; printed as one line.

    ``exit_status`` says which kind: a usage mistake by default.
    """

    exit_status = EXIT_USAGE


class CommandFailed(CommandError):
    """The operation ran and failed (a check found a fault, a migration
    did not complete): not a mistake on the command line."""

    exit_status = EXIT_FAILED


class ConfigError(CommandError):
    """A configuration file is missing, unreadable or holds a bad value."""

    exit_status = EXIT_CONFIG


class EnvironmentProblem(CommandError):
    """The machine cannot do what was asked: an address, a driver, memory."""

    exit_status = EXIT_ENVIRONMENT


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which.

    A KeyboardInterrupt, so that a command handles Ctrl-C and SIGTERM
    the same way, and ``except Exception`` on the way out swallows
    neither.
    """

    def __init__(self, signum: int, outcome: str | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        #: What became of the work the signal interrupted, for the one
        #: line the command prints.
        self.outcome = outcome
