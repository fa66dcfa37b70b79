"""Host and engine errors become Nova's at the driver boundary."""

import pytest
from nova import exception

from nova_xen_ncm.engine import errors as engine_errors
from nova_xen_ncm.engine import messages
from nova_xen_ncm.host import base
from nova_xen_ncm.virt import exceptions


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (base.DomainNotFound("gone"), exception.InstanceNotFound),
        (base.DomidInUse("taken"), exception.MigrationPreCheckError),
        (
            base.InsufficientMemory("full"),
            exception.ComputeResourcesUnavailable,
        ),
        (base.NotSupported("no"), exception.NotSupported),
        (base.HostError("broken"), exception.InternalError),
        (
            engine_errors.Refused(messages.RefuseReason.DOMID_TAKEN, "x"),
            exception.MigrationPreCheckError,
        ),
        (engine_errors.TransportError("cut"), exception.MigrationError),
    ],
)
def test_map(error, expected):
    translated = exceptions.nova_exception(error)
    assert type(translated) is expected
    assert str(error) in str(translated)


def test_unknown_error_is_not_mapped():
    assert exceptions.nova_exception(ValueError("x")) is None


class Ops:
    def lookup(self, error):
        raise error

    def _private(self, error):
        raise error


def test_translate_all_wraps_public_methods_only():
    cls = exceptions.translate_all(type("Wrapped", (Ops,), dict(vars(Ops))))
    ops = cls()
    with pytest.raises(exception.InstanceNotFound) as info:
        ops.lookup(base.DomainNotFound("no domain 7", call="find_domain"))
    assert isinstance(info.value.__cause__, base.DomainNotFound)
    with pytest.raises(base.DomainNotFound):
        ops._private(base.DomainNotFound("x"))
    with pytest.raises(ValueError):
        ops.lookup(ValueError("not ours"))
