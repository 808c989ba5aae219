"""Each error of the API raises its own exception, with a message that says what to do."""

from __future__ import annotations

import numpy as np
import pytest

import tent_async as tent

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_views_are_bounds_checked_at_creation() -> None:
    async with tent.Engine() as engine:
        seg = engine.register(bytearray(100), name="buf")
        assert len(seg[10:20]) == 10 and len(seg[-10:]) == 10 and len(seg[:]) == 100
        for bad in (slice(0, 101), slice(-101, None), slice(50, 40), slice(101, None)):
            with pytest.raises(tent.OutOfBoundsError, match="outside segment 'buf'") as info:
                seg[bad]
            assert isinstance(info.value, IndexError)  # generic handlers still work
        with pytest.raises(tent.OutOfBoundsError, match="contiguous"):
            seg[0:10:2]
        with pytest.raises(TypeError, match="slice"):
            seg[3]  # type: ignore[index]
        view = seg[10:20]
        with pytest.raises(tent.OutOfBoundsError, match="10-byte view"):
            view[5:11]


async def test_length_mismatch() -> None:
    async with tent.Engine() as engine:
        a = engine.register(bytearray(100))
        b = engine.register(bytearray(100))
        with pytest.raises(tent.LengthMismatchError, match="same length") as info:
            await engine.transfer(a[0:10], b[0:11])
        assert isinstance(info.value, ValueError)


async def test_unregistered_and_foreign_segments() -> None:
    async with tent.Engine() as engine, tent.Engine() as other:
        a = engine.register(bytearray(100))
        b = engine.register(bytearray(100))
        foreign = other.register(bytearray(100))
        with pytest.raises(tent.UnregisteredSegmentError, match="another engine"):
            await engine.transfer(a[0:10], foreign[0:10])
        engine.unregister(b)
        with pytest.raises(tent.UnregisteredSegmentError, match="unregistered"):
            await engine.transfer(a[0:10], b[0:10])
        with pytest.raises(tent.UnregisteredSegmentError, match="no segment named"):
            engine.segment("nope")
    # after the engine closed, its segments are no longer usable
    with pytest.raises(tent.UnregisteredSegmentError):
        a.check_owner(engine)


async def test_read_only_destination_and_read_only_buffers() -> None:
    async with tent.Engine() as engine:
        src = engine.register(bytearray(100))
        ro = engine.register(bytearray(100), permission="r")
        with pytest.raises(tent.ReadOnlySegmentError, match="read-only") as info:
            await engine.transfer(src[0:10], ro[0:10])
        assert isinstance(info.value, PermissionError)
        with pytest.raises(tent.ReadOnlySegmentError, match="permission='r'"):
            engine.register(b"immutable bytes")
        frozen = np.zeros(16, dtype=np.uint8)
        frozen.flags.writeable = False
        with pytest.raises(tent.ReadOnlySegmentError):
            engine.register(frozen)
        seg = engine.register(b"immutable bytes", permission="r")
        assert seg.permission == "r"
        with pytest.raises(tent.ConfigError, match="'r' or 'rw'"):
            engine.register(bytearray(4), permission="w")  # type: ignore[arg-type]


async def test_wrong_types() -> None:
    async with tent.Engine() as engine:
        with pytest.raises(tent.UnsupportedBufferError, match="neither the buffer protocol") as info:
            engine.register(object())
        assert isinstance(info.value, TypeError)
        with pytest.raises(tent.UnsupportedBufferError, match="non-contiguous"):
            engine.register(np.zeros((8, 8), dtype=np.uint8)[:, ::2])
        a = engine.register(bytearray(100))
        with pytest.raises(tent.UnsupportedBufferError, match="register the buffer"):
            await engine.transfer(bytearray(10), a[0:10])  # type: ignore[arg-type]
        with pytest.raises(tent.UnsupportedBufferError, match="registered already"):
            engine.register(a)
        with pytest.raises(TypeError, match="pairs"):
            engine.submit_batch([a[0:1]])  # type: ignore[list-item]


async def test_duplicate_names_and_busy_segments() -> None:
    async with tent.Engine(rails=[tent.RailSpec(name="slow", bandwidth="50MB/s")]) as engine:
        a = engine.register(np.zeros(8 << 20, dtype=np.uint8), name="a")
        with pytest.raises(tent.DuplicateSegmentError, match="'a' is registered already"):
            engine.register(bytearray(4), name="a")
        b = engine.register(np.zeros(8 << 20, dtype=np.uint8), name="b")
        handle = engine.submit(a[:], b[:])
        with pytest.raises(tent.SegmentBusyError, match="1 open transfer"):
            engine.unregister(a)
        handle.cancel()
        with pytest.raises(tent.TransferCancelledError):
            await handle
        engine.unregister("a")  # idle again: allowed
        assert "a" not in engine.segments


async def test_overlapping_views() -> None:
    async with tent.Engine() as engine:
        a = engine.register(bytearray(100))
        with pytest.raises(tent.OverlappingViewsError, match="overlaps"):
            await engine.transfer(a[0:50], a[25:75])
        with pytest.raises(tent.OverlappingViewsError, match="overlaps destination"):
            await engine.transfer_batch([(a[0:10], a[50:60]), (a[20:30], a[55:65])])
        await engine.transfer(a[0:50], a[50:100])  # adjacent is fine


async def test_bad_configuration() -> None:
    with pytest.raises(tent.ConfigError, match="unknown policy"):
        tent.Engine(policy="fastest")
    with pytest.raises(tent.ConfigError, match="unknown backend"):
        tent.Engine(backend="carrier-pigeon")
    with pytest.raises(tent.ConfigError, match="unique"):
        tent.Engine(rails=[tent.RailSpec(name="a"), tent.RailSpec(name="a")])
    with pytest.raises(ValueError, match="bandwidth"):
        tent.RailSpec(name="a", bandwidth="fast")
    with pytest.raises(ValueError, match="rail name"):
        tent.RailSpec(name="")
    with pytest.raises(ValueError, match="min_slice"):
        tent.SchedulerConfig(min_slice="1MiB", max_slice="64KiB")
    with pytest.raises(tent.ConfigError, match="RailSpec"):
        tent.Engine(rails=["nic0"])  # type: ignore[list-item]


def test_units() -> None:
    assert tent.parse_bandwidth("2GB/s") == 2e9
    assert tent.parse_bandwidth("400Gb/s") == 50e9
    assert tent.parse_bandwidth("800mbit") == 100e6
    assert tent.parse_bandwidth("1GiB/s") == 1024**3
    assert tent.parse_size("64MiB") == 64 << 20
    assert tent.parse_size(4096) == 4096
    assert tent.parse_duration("5us") == pytest.approx(5e-6)
    assert tent.parse_duration("2ms") == pytest.approx(2e-3)
    for bad in ("-1", "1Gb", "lots"):
        with pytest.raises(ValueError, match="size"):
            tent.parse_size(bad)
    with pytest.raises(ValueError, match="positive"):
        tent.parse_bandwidth(0)


async def test_start_up_errors_come_out_as_themselves() -> None:
    from tent_async.backends.local import LocalBackend

    class Failing(LocalBackend):
        async def start(self, ctx):  # type: ignore[no-untyped-def]
            raise tent.ConfigError("no such device: nic9")

    with pytest.raises(tent.ConfigError, match="nic9"):  # not wrapped in an ExceptionGroup
        async with tent.Engine(backend=Failing()):
            pass


def test_non_finite_numbers_are_refused() -> None:
    for bad in (float("inf"), float("nan"), "infGB/s"):
        with pytest.raises(ValueError, match="bandwidth"):
            tent.RailSpec(name="a", bandwidth=bad)
    with pytest.raises(ValueError, match="size"):
        tent.parse_size(float("inf"))
    with pytest.raises(ValueError, match="duration"):
        tent.parse_duration(float("nan"))


async def test_numpy_integers_slice_and_booleans_do_not() -> None:
    async with tent.Engine() as engine:
        seg = engine.register(bytearray(100))
        view = seg[np.int64(10) : np.int32(20)]
        assert (view.offset, view.length) == (10, 10)
        with pytest.raises(TypeError, match="booleans"):
            seg[True:5]
        with pytest.raises(TypeError, match="integers"):
            seg[1.5:5]  # type: ignore[misc]


def test_every_configuration_error_is_a_config_error() -> None:
    """Bad settings raise ConfigError (a TentError and a ValueError), saying what is wrong."""
    cases: list[tuple[object, str]] = [
        (lambda: tent.RailSpec(name="a", bandwidth="abc"), "cannot read 'abc' as a bandwidth"),
        (lambda: tent.RailSpec(name="a", bandwidth="-1GB/s"), "a bandwidth must be positive"),
        (lambda: tent.RailSpec(name="a", bandwidth=0), "a bandwidth must be positive"),
        (lambda: tent.RailSpec(name="a", bandwidth=float("inf")), "a bandwidth must be finite"),
        (lambda: tent.RailSpec(name="a", latency="-5us"), "not negative"),
        (lambda: tent.RailSpec(name="a", tier="far"), "unknown tier"),
        (lambda: tent.RailSpec(name="a", tier=7), "unknown tier"),
        (lambda: tent.RailSpec(name="a", options=["x"]), "mapping"),
        (lambda: tent.RailSpec(name="a b"), "rail name"),
        (lambda: tent.SchedulerConfig(window=0), "window must be at least 1"),
        (lambda: tent.SchedulerConfig(window="2"), "window must be an integer"),
        (lambda: tent.SchedulerConfig(tie_band=-0.1), "tie_band must not be negative"),
        (lambda: tent.SchedulerConfig(ewma_alpha=2.0), r"ewma_alpha must be in \(0, 1\]"),
        (lambda: tent.SchedulerConfig(deadline_factor="4"), "deadline_factor must be a number"),
        (lambda: tent.SchedulerConfig(tier_penalty=(1.0, 0.5)), "tier_penalty"),
        (lambda: tent.SchedulerConfig(min_slice="1MiB", max_slice="64KiB"), "must not exceed max_slice"),
        (lambda: tent.SchedulerConfig(min_slice="-4KiB"), "size must be a finite, non-negative"),
        (lambda: tent.SchedulerConfig(deadline_floor="soon"), "as a duration"),
        (lambda: tent.parse_size("1Gb"), "as a size"),
    ]
    for make, message in cases:
        with pytest.raises(tent.ConfigError, match=message) as info:
            make()  # type: ignore[operator]
        assert isinstance(info.value, tent.TentError) and isinstance(info.value, ValueError)
    tent.SchedulerConfig(window=np.int64(3), tie_band=np.float64(0.1))  # numpy numbers are numbers


def test_a_bandwidth_needs_a_per_second_unit() -> None:
    for amount in ("1GB", "500 MB", "2GiB"):
        with pytest.raises(tent.ConfigError, match="per-second unit") as info:
            tent.RailSpec(name="a", bandwidth=amount)
        assert f"'{amount.strip()}/s'" in str(info.value)  # says what to write instead
    assert tent.parse_bandwidth("1GB/s") == 1e9
    assert tent.parse_bandwidth("1GBps") == 1e9
    assert tent.parse_bandwidth("8Gbit") == 1e9  # bits are rates, as tc writes them
    assert tent.parse_bandwidth("2e9") == 2e9  # a plain number is bytes/s


async def test_notify_must_be_text_of_bounded_size() -> None:
    async with tent.Engine() as engine:
        a = engine.register(bytearray(100))
        b = engine.register(bytearray(100))
        with pytest.raises(tent.ConfigError, match=r"notify must be a str.*got int 123"):
            await engine.transfer(a[0:10], b[0:10], notify=123)  # type: ignore[arg-type]
        with pytest.raises(tent.ConfigError, match="notify must be a str"):
            engine.submit_batch([(a[0:10], b[0:10])], notify=b"bytes")  # type: ignore[arg-type]
        with pytest.raises(tent.ConfigError, match="the limit is 65536"):
            engine.submit(a[0:10], b[0:10], notify="x" * 65537)
        with pytest.raises(tent.ConfigError, match="valid Unicode"):
            engine.submit(a[0:10], b[0:10], notify="\ud800")
        assert engine.telemetry().open_transfers == 0  # nothing was started by a refused call
        await engine.transfer(a[0:10], b[0:10], notify="")  # an empty message is a message
        await engine.transfer(a[0:10], b[0:10], notify="é" * (65536 // 2))  # at the limit


async def test_writing_into_a_peers_read_only_segment_says_the_peer_granted_read_only() -> None:
    from tent_async.backends.local import LocalBackend

    class Reaching(LocalBackend):  # a backend that can reach "peers" (as ucx does)
        def check_remote(self, segment: tent.SegmentBase) -> None:
            return None

    class FakePeer:
        name = "decode-0"

    async with tent.Engine(backend=Reaching()) as engine:
        src = engine.register(bytearray(100))
        remote = tent.RemoteSegment(FakePeer(), "kv", 100, "host", "r", sid=1)
        with pytest.raises(tent.ReadOnlySegmentError, match="the peer granted read-only") as info:
            engine.submit(src[0:10], remote[0:10])
        assert "peer's segment 'kv'" in str(info.value) and "permission='rw'" in str(info.value)


def test_simulated_fabric_values_raise_config_errors() -> None:
    from tent_async.backends.sim import Degrade, Elephants, PairTopology, SimRail, flapping

    for make, message in [
        (lambda: SimRail(name="", capacity="1GB/s"), "non-empty name"),
        (lambda: SimRail(name="a", capacity="-1GB/s"), "a bandwidth must be positive"),
        (lambda: SimRail(name="a", capacity="1GB/s", profile=["x"]), "link profile"),
        (lambda: Degrade(at=0.0, factor=0.0), "Degrade factor"),
        (lambda: flapping(0.0, "1ms", "1ms", count=0), "at least one outage"),
        (lambda: PairTopology(rails=()), "at least one rail"),
        (lambda: Elephants(size="1MiB", concurrency=0), "concurrency must be at least 1"),
    ]:
        with pytest.raises(tent.ConfigError, match=message):
            make()  # type: ignore[no-untyped-call]
