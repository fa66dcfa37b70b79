"""The ``openstack xen-ncm ...`` commands: an OpenStackClient plugin.

:mod:`.plugin` is what OpenStackClient loads through the
``openstack.cli.extension`` entry point; the commands (cliff commands
on osc-lib) call the same functions as ``nova-xen-ncm drain``, ``watch``
and ``recover`` and differ only in how they print: cliff's formatters
(``-f table|json|value|csv|yaml``, ``-c COLUMN``) on stdout, progress
on stderr, and the exit statuses of :mod:`nova_xen_ncm.cmd`.
"""
