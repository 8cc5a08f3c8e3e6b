"""Hosts on one machine: Linux network namespaces on a bridge, for tests of what crosses a network.

A :class:`Network` makes a bridge in this namespace (with the gateway address, where services
such as the emulator and S3 listen) and one namespace per host, each joined to the bridge by a
veth pair and given its own address. :meth:`Network.cut` takes a host's link down (its processes
live on, but no packet reaches them or leaves them) and :meth:`Network.restore` brings it back.
No traffic leaves the machine: the bridge has no uplink. Everything is removed on close.

It needs root (or CAP_NET_ADMIN) and ``ip`` from iproute2; :func:`unavailable` says why not.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from typing import Self

from devstack.ha import Place


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unavailable() -> str | None:
    """None when namespaces can be made here, else the reason (for a skip)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    probe = f"aqprobe{random.randrange(10**6)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces are not allowed here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Network:
    """A bridge and namespaced hosts on a /24 of 10.0.0.0/8 chosen at random."""

    def __init__(self) -> None:
        self.tag = f"{random.randrange(36**4):04x}"[-4:]
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"aq{self.tag}br"
        self.gateway = Place(f"{self.subnet}.1")
        self.hosts: dict[str, tuple[str, Place]] = {}  # name -> (host-side veth, place)

    def start(self) -> Self:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway.host}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> Place:
        """A namespace with one address on the bridge (and its loopback up)."""
        index = len(self.hosts) + 10
        netns = f"aq{self.tag}-{name}"
        outer, inner = f"aq{self.tag}{index}h", f"aq{self.tag}{index}n"
        place = Place(f"{self.subnet}.{index}", netns)
        _ip("netns", "add", netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", netns, "addr", "add", f"{place.host}/24", "dev", inner)
        _ip("-n", netns, "link", "set", inner, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway.host)
        self.hosts[name] = (outer, place)
        return place

    def cut(self, name: str) -> None:
        """The host drops off the network: its link goes down (nothing is closed or reset)."""
        _ip("link", "set", self.hosts[name][0], "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self.hosts[name][0], "up")

    def close(self) -> None:
        for outer, place in self.hosts.values():
            _ip("link", "del", outer, check=False)
            if place.netns:
                _ip("netns", "del", place.netns, check=False)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
