"""Sphinx configuration of the nova-xen-ncm documentation."""

import os
import sys

# The local extension that renders the nova-xen-ncm CLI reference.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

project = "nova-xen-ncm"
copyright = "nova-xen-ncm developers"
extensions = [
    "openstackdocstheme",
    "oslo_config.sphinxext",
    "cliff.sphinxext",
    "reno.sphinxext",
    "nova_xen_ncm_cli",
]
master_doc = "index"
exclude_patterns = ["_build"]

# openstackdocstheme
html_theme = "openstackdocs"
openstackdocs_repo_name = "nova-xen-ncm"
openstackdocs_bug_project = "nova-xen-ncm"
openstackdocs_bug_tag = "doc"
openstackdocs_auto_name = False

# The openstack xen-ncm commands (cliff.sphinxext).
autoprogram_cliff_application = "openstack"
# Every command has --help; listing it for each says nothing.
autoprogram_cliff_ignored = ["--help"]
