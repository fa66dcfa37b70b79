"""Host and engine errors translated to Nova's, once, at the boundary.

The ops modules raise what ``nova_xen_ncm.host.base`` and
``nova_xen_ncm.engine`` raise; :func:`translate` turns those into the
``nova.exception`` classes the compute manager knows how to handle
(InstanceNotFound makes a vanished guest a NOSTATE instance, a
MigrationPreCheckError makes the scheduler try another host).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any
from typing import TypeVar

from nova import exception
from oslo_log import log as logging

from nova_xen_ncm.engine import errors as engine_errors
from nova_xen_ncm.host import base

LOG = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Most specific first: the first isinstance match wins.
ERROR_MAP: tuple[tuple[type[Exception], type[Exception]], ...] = (
    (base.DomainNotFound, exception.InstanceNotFound),
    (base.DomidInUse, exception.MigrationPreCheckError),
    (base.InsufficientMemory, exception.ComputeResourcesUnavailable),
    (base.NotSupported, exception.NotSupported),
    (base.HostError, exception.InternalError),
    (engine_errors.Refused, exception.MigrationPreCheckError),
    (engine_errors.EngineError, exception.MigrationError),
)


def nova_exception(error: Exception) -> exception.NovaException | None:
    """The Nova exception for a host or engine error (None if unknown)."""
    for source, target in ERROR_MAP:
        if isinstance(error, source):
            # The message is given whole: Nova's format strings need
            # kwargs (instance_id, uuid, ...) the host does not know.
            return target(message=str(error))
    return None


def translate(function: F) -> F:
    """Re-raise host and engine errors of ``function`` as Nova's."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (base.HostError, engine_errors.EngineError) as error:
            translated = nova_exception(error)
            LOG.debug(
                "%s: %s raised as %s",
                function.__qualname__,
                type(error).__name__,
                type(translated).__name__,
            )
            raise translated from error

    wrapper.__signature__ = inspect.signature(function)
    return wrapper  # type: ignore[return-value]


def translate_all(cls: type) -> type:
    """Apply :func:`translate` to every public method of ``cls``."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        setattr(cls, name, translate(member))
    return cls
