"""Sphinx configuration of the nova-xen-ncm release notes."""

project = "nova-xen-ncm Release Notes"
extensions = ["reno.sphinxext"]
master_doc = "index"
