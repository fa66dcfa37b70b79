"""Non-cooperative migration records (specified in doc/source/specs/)."""

from nova_xen_ncm.stream.records import RecordType

LIBXC_RECORDS: list[RecordType] = []
LIBXL_RECORDS: list[RecordType] = []
