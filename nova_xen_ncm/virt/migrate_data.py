"""The driver's LiveMigrateData: what the destination tells the source.

``XenNCMLiveMigrateData`` travels destination -> conductor -> source ->
destination inside Nova's RPC. Two things about it are deliberate:

* It subclasses ``HyperVLiveMigrateData``. The compute manager decides
  whether to run ``driver.cleanup`` on the source after a migration and
  whether to call ``rollback_live_migration_at_destination`` after a
  failure from ``isinstance`` checks on the libvirt and Hyper-V classes
  only (``ComputeManager._live_migration_cleanup_flags``). As a Hyper-V
  object it gets ``do_cleanup = True`` on both paths and
  ``destroy_disks = not is_shared_instance_path``; nothing else of
  Hyper-V applies. The source's cleanup alone would not need it
  (``post_live_migration_at_source`` destroys and unplugs), but without
  ``do_cleanup`` a failed migration never reaches
  ``rollback_live_migration_at_destination``: the receiver, a
  half-built domain and the vifs plugged there would stay.
* nova-conductor rebuilds the object from its primitive, so this module
  must be imported in the conductor too: :mod:`nova_xen_ncm.virt.novahook`
  does that without configuration (see doc/source/nova.rst).
"""

from __future__ import annotations

from nova.objects import base as obj_base
from nova.objects import fields
from nova.objects import migrate_data
from oslo_utils import versionutils
from oslo_versionedobjects import fields as ovo_fields


class _Secret(ovo_fields.String):
    """A string that never appears in logs (Nova logs migrate_data at
    debug level; SensitiveStringField only masks password=... text)."""

    @staticmethod
    def stringify(value):
        return "'***'"


class SecretField(ovo_fields.AutoTypedField):
    AUTO_TYPE = _Secret()


@obj_base.NovaObjectRegistry.register
class XenNCMLiveMigrateData(migrate_data.HyperVLiveMigrateData):
    # Version 1.0: Initial version
    # Version 1.1: Added source_address
    VERSION = "1.1"

    fields = {
        # The engine's name of this migration (the Nova migration UUID).
        "migration_id": fields.StringField(),
        # Where the destination's receiver listens.
        "receiver_host": fields.StringField(),
        "receiver_port": fields.IntegerField(),
        # The one-time token the source proves it holds (hex).
        "token": SecretField(),
        # The guest's domid on the source, and the one the destination
        # checked free for it (they are equal: the guest sees its domid).
        "source_domid": fields.IntegerField(),
        "dest_domid": fields.IntegerField(),
        "pv_drivers": fields.BooleanField(),
        # Transport and policy options both hosts agreed on.
        "options": fields.DictOfStringsField(),
        # The address the source's engine connects from: the only one the
        # destination's listener admits (with [xen_ncm] allowed_sources).
        "source_address": fields.StringField(),
    }

    def obj_make_compatible(self, primitive, target_version):
        # Versions of this class are its own: Hyper-V's field history
        # (HyperVLiveMigrateData.obj_make_compatible) does not apply.
        super(migrate_data.HyperVLiveMigrateData, self).obj_make_compatible(
            primitive, target_version
        )
        if versionutils.convert_version_to_tuple(target_version) < (1, 1):
            primitive.pop("source_address", None)

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.receiver_host, self.receiver_port

    @property
    def token_bytes(self) -> bytes:
        return bytes.fromhex(self.token)
