"""Sphinx configuration of the nova-xen-ncm documentation."""

project = "nova-xen-ncm"
copyright = "nova-xen-ncm developers"
extensions = ["oslo_config.sphinxext"]
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
