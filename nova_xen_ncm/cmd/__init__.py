"""Console entry points of nova-xen-ncm."""


class CommandError(Exception):
    """An error the user can act on; printed as one line, exit status 2."""
