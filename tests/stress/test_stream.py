"""Stream mode's windows (``msgsock.app.stress.stream``): pure, no socket and no clock."""

from __future__ import annotations

from msgsock.app.stress import StressConfig
from msgsock.app.stress.payload import _Payloads
from msgsock.app.stress.stream import _stream_eligible, _StreamAccount, _StreamLayout
from msgsock.framing import FrameFormat


def _layout(cfg: StressConfig) -> _StreamLayout:
    return _StreamLayout(cfg.frame, cfg.depth, cfg.connections, _Payloads(cfg))


def test_windows_hold_the_exact_messages() -> None:
    """The window holds, for every message in flight, exactly the encoded message (sequence numbers
    past 2**8, 2**16 and 2**40; connection ids past 2**8; several frames)."""
    cases = [(64, "u32be", 16, 16), (1000, "u32be", 16, 256), (13, "u8", 3, 1), (5000, "u16le", 40, 2000)]
    for size, spec, depth, conns in cases:
        cfg = StressConfig(
            size_min=size, size_max=size, depth=depth, connections=conns, frame=FrameFormat.parse(spec)
        )
        payloads = _Payloads(cfg)
        layout = _layout(cfg)
        ml = layout.mlen
        assert layout.window % layout.block == 0 and layout.window >= depth + layout.block
        for cid in (0, 1, 300, 70000):
            acct = _StreamAccount(cid)
            for start in (0, 2**16 - 2 * layout.block, 2**40 - layout.block):
                acct.win = bytearray()
                acct.wtop = acct.next_rx = start
                for step in range(3 * layout.window // depth + 3):
                    s1 = acct.next_rx + depth
                    layout.extend(acct, s1)
                    for seq in range(acct.next_rx, s1):
                        off = seq % layout.window * ml
                        want = cfg.frame.encode(payloads.expected(cid, seq))
                        assert acct.win[off : off + ml] == want, (size, spec, cid, seq)
                    acct.next_rx += step % depth + 1


def test_leaving_stream_mode_rebuilds_pending_and_the_unfinished_reply() -> None:
    """Leaving stream mode puts every unanswered message in ``pending`` with its write time, and the
    protocol it returns already holds the verified start of an unfinished reply."""
    cfg = StressConfig(size_min=40, size_max=40, depth=6)
    payloads = _Payloads(cfg)
    layout = _layout(cfg)
    ml = layout.mlen
    acct = _StreamAccount(9)
    acct.stream = True
    layout.extend(acct, 6)
    acct.wlog.extend([(4, 100), (6, 200)])  # messages [0, 4) written at 100, [4, 6) at 200
    acct.tx_seq = 6
    acct.next_rx = 1
    acct.rx = ml + 10  # message 0 verified, 10 bytes of message 1
    wire = bytes(acct.win[ml : 2 * ml])
    proto = layout.leave(acct)
    assert proto is not None and not acct.stream and not acct.win and not acct.wlog
    assert acct.pending == {1: 100, 2: 100, 3: 100, 4: 200, 5: 200}
    assert proto.receive_data(wire[10:]) == [payloads.expected(9, 1)]


def test_leaving_without_decoding_returns_no_protocol() -> None:
    """A connection that ends on our side leaves stream mode without a protocol."""
    cfg = StressConfig(size_min=40, size_max=40)
    acct = _StreamAccount(0)
    acct.stream = True
    acct.wlog.append((1, 5))
    acct.tx_seq = 1
    assert _layout(cfg).leave(acct, decode=False) is None
    assert acct.pending == {0: 5}


def test_which_runs_use_stream_mode() -> None:
    """Stream mode is for TCP, closed loop, echo, one fixed size of 13 bytes to 32 KiB, no fields."""

    def eligible(**kw: object) -> bool:
        cfg = StressConfig(**{"size_min": 64, "size_max": 64, **kw})  # type: ignore[arg-type]
        return _stream_eligible(cfg, _Payloads(cfg))

    assert eligible()
    assert eligible(size_min=13, size_max=13)
    assert not eligible(size_min=12, size_max=12)
    assert not eligible(size_min=32 * 1024, size_max=32 * 1024)
    assert not eligible(size_min=13, size_max=64)
    assert not eligible(udp=True)
    assert not eligible(rate=100.0)
    assert not eligible(expect="reverse")
    assert not eligible(frame=FrameFormat.parse("u32be+kind:B"))
