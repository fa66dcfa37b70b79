"""Registers what the minicloud's services and users need, idempotently.

Run by ``minicloud up`` with the cloud's own Python (its venv has
openstacksdk):

    python register.py identity   # service users, catalog
    python register.py resources  # image, flavor, network and subnet

Credentials of the admin come from the environment (OS_AUTH_URL,
OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME, OS_USER_DOMAIN_NAME,
OS_PROJECT_DOMAIN_NAME), the rest from MINICLOUD_* variables.
"""

from __future__ import annotations

import os
import sys

import openstack

REGION = "RegionOne"


def _env(name: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        sys.exit(f"register.py: {name} is not set")


def _connect():
    return openstack.connect(
        auth_url=_env("OS_AUTH_URL"),
        username=_env("OS_USERNAME"),
        password=_env("OS_PASSWORD"),
        project_name=_env("OS_PROJECT_NAME"),
        user_domain_name=_env("OS_USER_DOMAIN_NAME"),
        project_domain_name=_env("OS_PROJECT_DOMAIN_NAME"),
        region_name=REGION,
    )


def identity() -> None:
    conn = _connect()
    ident = conn.identity
    password = _env("MINICLOUD_SERVICE_PASSWORD")
    host = _env("MINICLOUD_SERVICE_HOST")
    # type, name, user, URL: the services a devstack of these enables.
    catalog = [
        ("image", "glance", "glance", f"http://{host}:9292"),
        ("placement", "placement", "placement", f"http://{host}:8778"),
        ("compute", "nova", "nova", f"http://{host}:8774/v2.1"),
        ("network", "neutron", "neutron", f"http://{host}:9696"),
    ]
    domain = ident.find_domain("Default")
    project = ident.find_project("service", domain_id=domain.id)
    if project is None:
        project = ident.create_project(
            name="service", domain_id=domain.id, description="Services"
        )
    admin_role = ident.find_role("admin")
    service_role = ident.find_role("service") or ident.create_role(
        name="service"
    )
    for kind, name, username, url in catalog:
        user = ident.find_user(username, domain_id=domain.id)
        if user is None:
            user = ident.create_user(
                name=username,
                password=password,
                domain_id=domain.id,
                default_project_id=project.id,
            )
        for role in (admin_role, service_role):
            ident.assign_project_role_to_user(project, user, role)
        service = ident.find_service(name)
        if service is None:
            service = ident.create_service(name=name, type=kind)
        have = {
            e.interface
            for e in ident.endpoints(service_id=service.id, region_id=REGION)
        }
        for interface in ("public", "internal", "admin"):
            if interface not in have:
                ident.create_endpoint(
                    service_id=service.id,
                    interface=interface,
                    url=url,
                    region_id=REGION,
                )
        print(f"registered {kind} {name} at {url}")


def resources() -> None:
    conn = _connect()
    image_file = _env("MINICLOUD_IMAGE_FILE")
    if conn.image.find_image("ncm-guest") is None:
        conn.image.create_image(
            name="ncm-guest",
            filename=image_file,
            disk_format="raw",
            container_format="bare",
            visibility="public",
            wait=True,
        )
    flavor = conn.compute.find_flavor("ncm.small")
    if flavor is None:
        conn.compute.create_flavor(
            name="ncm.small", ram=512, vcpus=1, disk=1, is_public=True
        )
    network = conn.network.find_network("private")
    if network is None:
        network = conn.network.create_network(name="private", shared=True)
    if not list(conn.network.subnets(network_id=network.id)):
        conn.network.create_subnet(
            name="private-subnet",
            network_id=network.id,
            ip_version=4,
            cidr="10.0.0.0/26",
            gateway_ip="10.0.0.1",
        )
    print("registered image ncm-guest, flavor ncm.small, network private")


def main(argv: list[str]) -> None:
    steps = {"identity": identity, "resources": resources}
    if len(argv) != 1 or argv[0] not in steps:
        sys.exit(f"usage: register.py {'|'.join(steps)}")
    steps[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
