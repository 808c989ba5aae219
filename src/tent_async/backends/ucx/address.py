"""Checking a peer's UCX worker address before any byte of it reaches UCX.

UCX unpacks a worker address without knowing its length
(``ucp_address_unpack`` in ``src/ucp/wireup/address.c``): every length,
count and flag inside it is trusted, and a malformed one makes UCX read past
the buffer, assert or crash (issue 11, finding 4: a 40-byte address killed the
process with SIGABRT/SIGSEGV within a few tries).  So a peer's address is
parsed here first, by the same rules UCX 1.x uses (address versions 1 and 2,
non-unified mode), with every read bounds-checked, and then compared with the
address of the local rail it is going to be used on:

* it must be parsed to its very last byte, with nothing left over;
* its *shape* must be ours: the same header version and flags, the same
  devices with the same memory-domain indexes and flags, the same transports
  (name checksums) in the same order, with the same interface flags, and
  every device and interface address of the same length as ours.  Both ends
  run the same rail configuration and UCX release, so an honest peer's
  address differs from ours only in *contents*: its worker id, its IP
  address, ports, shared-memory segment ids, performance figures;
* contents are checked where their meaning is known: performance figures must
  be finite and not negative (bandwidth positive), path counts at least 1, and
  a TCP device address must have our address family and flags.

* a TCP device address (IPv4, not loopback) must point into the local rail's
  own subnet or at the address the peer's control connection comes from (or
  goes to): both are facts this engine knows, not claims of the peer.

What is not checked: the other values inside the device and interface
addresses (a port, a shared-memory id), and which host of the rail's subnet an
IPv4 address names.  UCX's transports treat those as addresses to connect to,
and a wrong one fails the connection (the fuzz test hands thousands of such
addresses to UCX).  A peer can therefore make this engine's UCX connect to
another port of its choosing on a host of that rail's subnet; see
docs/ucx.md, "Threat model".
"""

from __future__ import annotations

import ipaddress
import math
import socket
import struct
from collections.abc import Collection

import attrs

from ...errors import ProtocolError

# src/ucp/wireup/address.c (UCX 1.21), non-unified mode.
_V1, _V2 = 0, 1  # ucp_object_version_t
_HEADER_FLAG_WORKER_UUID = 0x02
_HEADER_FLAG_CLIENT_ID = 0x04
_HEADER_FLAG_DEBUG_INFO = 0x01
_FLAG_LAST = 0x80
_FLAG_HAS_EP_ADDR = 0x40
_FLAG_NUM_PATHS = 0x40
_FLAG_SYS_DEVICE = 0x20
_FLAG_MD_EMPTY_DEV = 0x80
_MD_MASK = 0x7F
_DEVICE_LEN_MASK = 0x1F
_IFACE_LEN_MASK = 0x3F
_NULL_RESOURCE = 0xFF
_MAX_RESOURCES = 128
_MAX_LANES = 64
_TCP_IPV4 = bytes([0, socket.AF_INET])  # uct_tcp_device_addr_t: no flags (not loopback), AF_INET
_V1_ATTR = struct.Struct("<fffI")  # overhead, bandwidth, lat_ovh, prio_cap_flags
_V2_ATTR = struct.Struct("<BBBBHH")  # fp8 overhead, bandwidth, latency; prio; seg_size; flags


class AddressError(ProtocolError):
    """A peer's UCX worker address is malformed, or not one this rail can use."""


@attrs.frozen
class Iface:
    csum: int
    attr_flags: int  # interface capability flags (priority and performance figures excluded)
    last: bool
    has_ep: bool
    addr: bytes
    ep_addrs: tuple[tuple[bytes, int, bool], ...]  # (address, lane, last)


@attrs.frozen
class Device:
    md_byte: int  # md index and the empty-device flag (the last, empty one also carries the release)
    dev_flags: int  # LAST, NUM_PATHS, SYS_DEVICE
    num_paths: int
    sys_dev: int
    addr: bytes
    ifaces: tuple[Iface, ...]


@attrs.frozen
class ParsedAddress:
    version: int
    header: bytes  # the header byte(s), flags included
    devices: tuple[Device, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise AddressError(
                f"the worker address ends inside {what} (needs {n} bytes at {self.pos} of {len(self.data)})"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def peek(self, what: str) -> int:
        if self.pos >= len(self.data):
            raise AddressError(f"the worker address ends before {what}")
        return self.data[self.pos]

    def extended(self, mask: int, version: int, what: str) -> int:
        """``ucp_address_unpack_byte_extended``: a masked byte, or (v2) the next byte if all mask bits are set."""
        value = self.u8(what) & mask
        if version != _V1 and value == mask:
            value = self.u8(what)
        return value


def _finite(value: float, what: str, *, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value <= 0):
        raise AddressError(f"the worker address has an implausible {what} ({value!r})")


def parse(data: bytes) -> ParsedAddress:
    """Parse a packed UCX worker address the way UCX does, with every read bounds-checked."""
    r = _Reader(bytes(data))
    first = r.u8("the header")
    version = first & 0x0F
    if version == _V1:
        flags = first >> 4
        header = bytes([first])
    elif version == _V2:
        flags = r.u8("the header flags")
        header = bytes([first, flags])
    else:
        raise AddressError(f"unknown worker address version {version}")
    if flags & _HEADER_FLAG_WORKER_UUID or version == _V1:
        r.take(8, "the worker id")
    if flags & _HEADER_FLAG_CLIENT_ID:
        r.take(8, "the client id")
    if flags & _HEADER_FLAG_DEBUG_INFO:
        r.take(r.u8("the worker name's length"), "the worker name")
    devices: list[Device] = []
    if r.peek("the device list") == _NULL_RESOURCE:
        r.u8("the empty device list")
    else:
        last_dev = False
        count = 0
        while not last_dev:
            md_byte = r.peek("a device's md index")
            r.extended(_MD_MASK, version, "a device's md index")
            empty = bool(md_byte & _FLAG_MD_EMPTY_DEV)
            dev_flags = r.peek("a device address length") & ~_DEVICE_LEN_MASK & 0xFF
            last_dev = bool(dev_flags & _FLAG_LAST)
            dev_len = r.extended(_DEVICE_LEN_MASK, version, "a device address length")
            num_paths = r.u8("a device's path count") if dev_flags & _FLAG_NUM_PATHS else 1
            if num_paths < 1:
                raise AddressError("the worker address gives a device no path")
            sys_dev = r.u8("a device's system device") if dev_flags & _FLAG_SYS_DEVICE else -1
            dev_addr = r.take(dev_len, "a device address")
            ifaces: list[Iface] = []
            last_tl = empty
            while not last_tl:
                count += 1
                if count > _MAX_RESOURCES:
                    raise AddressError(f"the worker address lists more than {_MAX_RESOURCES} transports")
                (csum,) = struct.unpack("<H", r.take(2, "a transport name checksum"))
                if version == _V1:
                    overhead, bandwidth, lat_ovh, prio_flags = _V1_ATTR.unpack(r.take(_V1_ATTR.size, "iface attrs"))
                    _finite(overhead, "overhead")
                    _finite(bandwidth, "bandwidth", positive=True)
                    _finite(abs(lat_ovh), "latency")
                    attr_flags = prio_flags >> 8  # the low 8 bits are the priority
                else:
                    _o, bw, _l, _prio, seg_size, attr_flags = _V2_ATTR.unpack(r.take(_V2_ATTR.size, "iface attrs"))
                    if bw == 0 or seg_size == 0:
                        raise AddressError("the worker address has an interface without bandwidth or segment size")
                tl_flags = r.peek("an interface address length")
                last_tl = bool(tl_flags & _FLAG_LAST)
                has_ep = bool(tl_flags & _FLAG_HAS_EP_ADDR)
                if_len = r.extended(_IFACE_LEN_MASK, version, "an interface address length")
                if_addr = r.take(if_len, "an interface address")
                ep_addrs: list[tuple[bytes, int, bool]] = []
                last_ep = not has_ep
                while not last_ep:
                    if len(ep_addrs) >= _MAX_LANES:
                        raise AddressError(f"the worker address has more than {_MAX_LANES} endpoint addresses")
                    ep_addr = r.take(r.u8("an endpoint address length"), "an endpoint address")
                    lane = r.u8("a lane index")
                    last_ep = bool(lane & _FLAG_LAST)
                    ep_addrs.append((ep_addr, lane & _IFACE_LEN_MASK, last_ep))
                ifaces.append(Iface(csum, attr_flags, last_tl, has_ep, if_addr, tuple(ep_addrs)))
            devices.append(Device(md_byte, dev_flags, num_paths, sys_dev, dev_addr, tuple(ifaces)))
    if r.pos != len(r.data):
        raise AddressError(f"the worker address has {len(r.data) - r.pos} bytes after its last device")
    return ParsedAddress(version=version, header=header, devices=tuple(devices))


def _shape(device: Device) -> tuple[object, ...]:
    return (
        device.md_byte,
        device.dev_flags,
        len(device.addr),
        tuple(
            (
                i.csum,
                i.attr_flags,
                i.last,
                i.has_ep,
                len(i.addr),
                tuple((len(a), lane, last) for a, lane, last in i.ep_addrs),
            )
            for i in device.ifaces
        ),
    )


def check_peer_address(peer: bytes, own: bytes, *, kind: str, allowed: Collection[ipaddress.IPv4Network] = ()) -> None:
    """Raise :class:`AddressError` unless ``peer`` is safe to hand to UCX on the rail whose address is ``own``.

    ``kind`` is the rail's kind (``tcp``, ``shm``, ``cuda``); ``allowed``, for a
    TCP rail, the networks an IPv4 address in it may point into: what this
    engine knows by itself (the rail's subnet, the control connection's remote
    address), never what the peer advertised.  Nothing allowed refuses every
    non-loopback IPv4 address (a loopback address points at this host anyway).
    """
    mine = parse(own)  # our own address: a failure here is a UCX layout this module does not know
    theirs = parse(peer)
    if theirs.version != mine.version or theirs.header != mine.header:
        raise AddressError(
            f"the worker address has header {theirs.header.hex()}, this rail's UCX makes {mine.header.hex()} "
            "(another UCX release or configuration?)"
        )
    if [_shape(d) for d in theirs.devices] != [_shape(d) for d in mine.devices]:
        raise AddressError(
            "the worker address does not have the layout of this rail's own address (other transports, "
            "flags or address lengths: another UCX release or rail configuration on the peer?)"
        )
    if kind == "tcp":
        for d_theirs, d_mine in zip(theirs.devices, mine.devices, strict=True):
            # uct_tcp_device_addr_t starts with its flags (loopback, ...) and the address family.
            if d_theirs.addr[:2] != d_mine.addr[:2]:
                raise AddressError("the worker address has a TCP device address of another kind or family")
            if d_theirs.addr[:2] == _TCP_IPV4:
                if len(d_theirs.addr) != 6:  # pragma: no cover - the layout check compared lengths with ours
                    raise AddressError("the worker address has a TCP device address of another length")
                ip = ipaddress.IPv4Address(d_theirs.addr[2:6])
                if not any(ip in net for net in allowed):
                    raise AddressError(
                        f"the worker address points at {ip}, outside this rail's subnet and not the peer's "
                        "control connection address"
                    )
