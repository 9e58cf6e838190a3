"""TCP connections over the simulated network, modelled on Linux's defaults.

Each end (`TcpEndpoint`) writes application messages (an object and its size in bytes) into a byte stream,
cuts the stream into segments of at most one MSS, and sends them with `Network.send`, so they queue, are
serialised, delayed and lost like any packet. The other end acknowledges cumulatively, with ACK packets
on the reverse path that can be lost or queued too, and hands whole messages to its `on_message` strictly
in the order they were written, each once. A connection is full duplex: ACKs ride on data when there is
some to send. Every packet is charged its bytes on the wire (payload, 52 bytes of IPv4 + TCP + timestamp
option, link framing if set) to the frame it carries (the frame of the message that owns its first byte;
a pure ACK is charged to the frame of the last data it acknowledges), retransmissions included.

What follows Linux (6.x, sysctl defaults) and the RFCs it implements:

- RTT and RTO (RFC 6298 as Linux does it): timestamps are on (RFC 7323), so every ACK that acknowledges new
  data gives a sample, also after a retransmission (no Karn's rule needed: the echo says which transmission
  is acknowledged). SRTT gains 1/8 and the deviation 1/4, but the 200 ms floor goes on the variance term,
  not on the sum: RTO = SRTT + max(200 ms, the largest 4*mdev seen in the last RTT, decaying), so RTO is at
  least SRTT + 200 ms, where RFC 6298 says max(1 s, SRTT + 4*RTTVAR). Initial RTO 1 s (RFC 6298), at most
  120 s, doubled on each expiry and recomputed from SRTT on the next valid sample.
- Loss detection: fast retransmit after three duplicate ACKs (RFC 5681); RACK (RFC 8985), which marks a
  segment lost once a segment sent after it has been delivered and a reordering window (min RTT / 4, zero
  once three are SACKed or in recovery) has passed, so a message of two or three segments whose first is
  lost is repaired after about 1.25 RTT, not an RTO; Tail Loss Probe (RFC 8985) after 2*SRTT (+200 ms with
  one segment out; never later than the RTO), which resends the last segment without collapsing the
  window; NewReno's partial ACK (RFC 6582) resends a hole no SACK has shown. SACK is modelled as each ACK
  naming the out-of-order segment that triggered it (one block: a lost ACK loses its block, where real
  SACK repeats up to three), so the holes of one window are resent together, in one round trip.
- Congestion window, in segments: initial window 10 (RFC 6928), slow start counting segments acknowledged,
  then CUBIC as Linux's tcp_cubic.c (RFC 9438): the window aims for W_max + 0.4 (t - K)^3 a round trip
  ahead, or for the Reno-friendly estimate (3 (1 - b) / (1 + b) = 0.53 segment per window acknowledged at
  b = 0.7) where that is ahead, at least 5% a round trip before the first loss; idle time does not count as
  epoch time (CA_EVENT_TX_START). It grows on cumulative ACKs only and only while the window limits the
  sender, with Linux's latch (tcp_cwnd_validate): once a send found the window full, the sender counts as
  window-limited until that window is acknowledged. On a fast retransmit ssthresh = 0.7 cwnd and PRR (RFC
  6937, Linux's tcp_cwnd_reduction) brings the window down as ACKs report deliveries, to ssthresh when the
  recovery ends; a loss that a tail loss probe repaired sets cwnd = ssthresh at once, as Linux's does; on an
  RTO ssthresh = 0.7 cwnd, cwnd = 1, CUBIC's state (W_max too) is reset and every unSACKed segment is resent
  in slow start; after an idle period longer than the RTO the window restarts (tcp_slow_start_after_idle).
  `TcpSettings` turns CUBIC (for Reno's one segment per window), PRR (for an immediate cut) and the latch
  (for 'the window was full when this ACK came') off one by one. Nagle's algorithm in Minshall's
  form (a small segment waits while an earlier small one is unacknowledged) is on, as paho-mqtt and
  Mosquitto leave it; so a small message written behind a lost small one waits in the sender, no duplicate
  ACK comes, and the loss costs the probe or the RTO, in Linux as here.
- ACKs: quick ACKs for the first 16 and after an idle gap longer than the RTO; then an ACK for every second
  full segment or 40 ms after the data (TCP_DELACK_MIN), sooner if it can ride on data; an immediate ACK for
  out-of-order or duplicate data and when a hole is filled (RFC 5681). An end that answers within 40 ms
  (an MQTT PUBACK) is interactive: no quick ACKs, so its ACK rides on the answer.
- An optional three-way handshake (`TcpConnection.open`): SYN and SYN-ACK (60 bytes), retried after the
  RTO with backoff; it gives each end its first RTT sample, as Linux's handshake does. A listening end
  whose `TcpConnection.accepting` says no (the server process is down) answers a SYN with a RST (40
  bytes), as a kernel does for a closed port; the opening end closes and calls `on_refused`.

What it simplifies, and why that is close enough for iotbed. CUBIC runs on the simulated clock in seconds
where Linux counts jiffies (its curve is recomputed at most every 1/32 s here, at most once a jiffy
there), and HyStart is left out: iotbed's flows are application-limited (messages of a few KB to tens of
KB, at rates that leave the link idle between them), so slow start seldom runs long enough for it. The
reordering window stays at min RTT / 4 where Linux widens it after seeing reordering, so a link with jitter
causes more spurious retransmissions here. Not modelled: the receive window (taken as never limiting:
Linux autotunes it up to 6 MB, iotbed's flights are below 100 KB) and the send buffer, delayed-ACK
timeouts above 40 ms (Linux lets them grow toward min(200 ms, SRTT) on long-RTT paths), HyStart, F-RTO and
undoing spurious reductions, pacing, TSO, FIN and RST other than refusing a SYN (an application closes
or resets a connection with `reset` or `abort`, at once), the per-destination metrics cache, giving up after
tcp_retries2.

Cost: no SimPy process per connection, and no SimPy event per timer beyond what fires. A packet is its own
SimPy event on each hop (`Network.transmit`), a message that fits one segment behind nothing unsent goes
out without queueing (`send`), and each end caches its route. Each end keeps its timers (RTO, probe,
reordering, delayed ACK) as numbers; the earliest goes into one heap that all ends on a network share
(`TimerQueue`), which keeps at most one SimPy event pending, for the earliest deadline that is still wanted.
A deadline that moves (an ACK clears the RTO; the delayed ACK rode on data) leaves its old heap entry behind,
and stale entries are dropped as they reach the top, without waking anything: most timers never fire.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Any

import simpy

from iotbed.sim.network import FrameAccount, Network, Packet, schedule

INF = math.inf
_EPS = 1e-9  # a timer event fires at its deadline give or take float rounding
_NO_SSTHRESH = 1 << 30

# Connection states (RFC 9293's, less the closing ones).
CLOSED = "closed"
LISTEN = "listen"
SYN_SENT = "syn_sent"
SYN_RCVD = "syn_rcvd"
ESTABLISHED = "established"

# Congestion states, as Linux's: Open, fast Recovery, Loss (after an RTO).
_OPEN, _RECOVERY, _LOSS = 0, 1, 2
_SYN, _SYNACK = 1, 2
_NO_ENDS: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class TcpSettings:
    mss: int = 1448  # 1500-byte MTU less 20 IPv4, 20 TCP and 12 timestamp-option bytes
    header_bytes: int = 52  # IPv4 + TCP + timestamp option, on every segment
    syn_bytes: int = 60  # SYN, SYN-ACK: IPv4 + TCP with MSS, SACK-permitted, timestamps, window scale
    sack_bytes: int = 12  # a SACK option with one block, on ACKs sent while data is out of order
    rst_bytes: int = 40  # a RST refusing a SYN: IPv4 + TCP, no options
    framing_bytes: int = 0  # link-layer bytes per packet; 0 as the rest of iotbed counts IP bytes
    initial_cwnd: int = 10  # segments (RFC 6928)
    rto_initial_s: float = 1.0
    rto_min_s: float = 0.2
    rto_max_s: float = 120.0
    dupthresh: int = 3
    beta: float = 0.7  # multiplicative decrease: CUBIC's, Linux's default
    delayed_ack_s: float = 0.04
    quickacks: int = 16
    rack: bool = True
    tail_loss_probe: bool = True
    nagle: bool = True
    slow_start_after_idle: bool = True
    cubic: bool = True  # window growth as Linux's CUBIC (its Reno-friendly region included); False: Reno's
    prr: bool = True  # fast recovery paces the window down (RFC 6937), as Linux; False: cut at once
    cwnd_latch: bool = True  # 'cwnd-limited' holds for a round trip once the window filled (tcp_cwnd_validate)

    def __post_init__(self) -> None:
        if self.mss <= 0 or self.initial_cwnd <= 0 or self.dupthresh <= 0:
            raise ValueError("mss, initial_cwnd and dupthresh must be above zero")
        if not 0.0 < self.rto_min_s <= self.rto_initial_s <= self.rto_max_s:
            raise ValueError("need 0 < rto_min_s <= rto_initial_s <= rto_max_s")
        if not 0.0 < self.beta < 1.0:
            raise ValueError("beta must lie in (0, 1)")


@dataclass(slots=True)
class TcpStats:
    """What one end sent and received; retransmissions are counted by what triggered them."""

    segments_sent: int = 0  # data segments, retransmissions included
    bytes_sent: int = 0  # payload bytes, retransmissions included
    wire_bytes: int = 0  # every packet this end handed to the network, headers included
    retransmits_rto: int = 0  # segments (and SYNs) resent after a timeout
    retransmits_fast: int = 0  # resent on duplicate ACKs, RACK or a partial ACK
    retransmits_tlp: int = 0  # resent as a tail loss probe
    timeouts: int = 0
    fast_recoveries: int = 0
    acks_sent: int = 0  # pure ACKs
    dup_acks: int = 0  # duplicate ACKs received
    duplicates_received: int = 0  # data segments that had arrived before
    messages_delivered: int = 0
    bytes_delivered: int = 0

    @property
    def retransmissions(self) -> int:
        return self.retransmits_rto + self.retransmits_fast + self.retransmits_tlp


@dataclass(slots=True, eq=False)
class _Data:
    """A segment's payload, kept by the sender until acknowledged; the same object travels in every copy."""

    seq: int
    end: int
    ends: tuple[Any, ...]  # the messages whose last byte is in this segment
    frame: FrameAccount | None
    sent_at: float  # the latest transmission
    transmissions: int = 1
    sacked: bool = False
    lost: bool = False
    retrans: bool = False  # a retransmission of it is in flight


@dataclass(slots=True, eq=False)
class TcpSegment:
    """What a packet carries: data or not, and always an acknowledgement (the `message` of a `Packet`)."""

    epoch: int  # the connection's incarnation; packets of an earlier one are dropped
    seq: int
    data: _Data | None
    tsval: float
    ack: int
    tsecr: float  # -1: nothing to echo
    sack: int = -1  # the out-of-order segment that triggered this ACK
    sack_ts: float = -1.0  # and the tsval it carried
    dsack: bool = False  # triggered by a duplicate
    syn: int = 0
    rst: bool = False  # a refusal of a SYN

    @property
    def messages(self) -> tuple[Any, ...]:
        """The application messages whose last byte this segment carries (for link taps)."""
        return self.data.ends if self.data is not None else _NO_ENDS


def _discard(_: Any) -> None:
    pass


_CUBIC_C = 0.4  # segments per second cubed (RFC 9438; Linux's bic_scale 41/1024 * 10)


class _Cubic:
    """CUBIC's state (Linux's tcp_cubic.c, in seconds instead of jiffies, without HyStart): the window it aims
    for, W_max + C (t - K)^3, and the Reno-friendly estimate that grows 3 (1 - b) / (1 + b) segments per
    window acknowledged; the faster of the two sets how many ACKs add one segment (`cnt`)."""

    __slots__ = (
        "cnt",
        "last_max_cwnd",
        "last_cwnd",
        "last_time",
        "origin",
        "k",
        "delay_min",
        "epoch_start",
        "ack_cnt",
        "tcp_cwnd",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """bictcp_reset: on an RTO, all is forgotten, W_max too."""
        self.cnt = 0
        self.last_max_cwnd = 0
        self.last_cwnd = 0
        self.last_time = 0.0
        self.origin = 0
        self.k = 0.0
        self.delay_min = 0.0
        self.epoch_start = -1.0  # < 0: no epoch (one starts at the first growth after a reduction)
        self.ack_cnt = 0
        self.tcp_cwnd = 0

    def ssthresh(self, cwnd: int, beta: float) -> int:
        """A loss: the epoch ends, W_max is remembered (lowered further when below the last, fast
        convergence), and the window goes to beta of itself."""
        self.epoch_start = -1.0
        if cwnd < self.last_max_cwnd:
            self.last_max_cwnd = int(cwnd * (1.0 + beta) / 2.0)
        else:
            self.last_max_cwnd = cwnd
        return max(2, int(cwnd * beta))

    def acked(self, rtt: float, now: float) -> None:
        """An RTT sample: the smallest is the `t + RTT` CUBIC aims a round trip ahead with (none taken in the
        first second of an epoch, as Linux)."""
        if self.epoch_start >= 0.0 and now - self.epoch_start < 1.0:
            return
        if self.delay_min == 0.0 or rtt < self.delay_min:
            self.delay_min = rtt

    def idle(self, idle_s: float, now: float) -> None:
        """Sending again with nothing in flight (CA_EVENT_TX_START): the idle spell does not count as epoch
        time, so an application-limited sender does not jump up the curve."""
        if self.epoch_start >= 0.0 and idle_s > 0.0:
            self.epoch_start = min(self.epoch_start + idle_s, now)

    def update(self, cwnd: int, acked: int, now: float, beta: float) -> int:
        """bictcp_update: ACKs per one segment of growth at `cwnd`."""
        self.ack_cnt += acked
        if self.last_cwnd == cwnd and now - self.last_time <= 1.0 / 32.0:
            return self.cnt  # recomputed at most every 1/32 s while the window stays
        self.last_cwnd = cwnd
        self.last_time = now
        if self.epoch_start < 0.0:
            self.epoch_start = now
            self.ack_cnt = acked
            self.tcp_cwnd = cwnd
            if self.last_max_cwnd <= cwnd:
                self.k = 0.0
                self.origin = cwnd
            else:
                self.k = ((self.last_max_cwnd - cwnd) / _CUBIC_C) ** (1.0 / 3.0)
                self.origin = self.last_max_cwnd
        t = now - self.epoch_start + self.delay_min
        delta = int(_CUBIC_C * abs(t - self.k) ** 3)
        target = self.origin - delta if t < self.k else self.origin + delta
        cnt = cwnd // (target - cwnd) if target > cwnd else 100 * cwnd
        if self.last_max_cwnd == 0 and cnt > 20:
            cnt = 20  # no loss seen yet: at least 5% a round trip
        # Reno-friendly: the window Reno with CUBIC's beta would have, 3 (1 - b) / (1 + b) a round trip.
        per = (cwnd * int(8.0 * (1.0 + beta) / 3.0 / (1.0 - beta))) >> 3
        while self.ack_cnt > per:
            self.ack_cnt -= per
            self.tcp_cwnd += 1
        if self.tcp_cwnd > cwnd:
            cnt = min(cnt, cwnd // (self.tcp_cwnd - cwnd))
        self.cnt = max(cnt, 2)
        return self.cnt


class TimerQueue:
    """The timers of every TCP end on one network: a heap of (deadline, order, end) and at most one pending
    SimPy event, for the earliest deadline an end still waits for (its `_wake`). Ends whose deadlines fall
    at the same instant are served in the order they set them."""

    __slots__ = ("env", "_heap", "_wake", "_order", "_callbacks")

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._heap: list[tuple[float, int, TcpEndpoint]] = []
        self._wake = INF  # when the pending SimPy event fires
        self._order = 0
        self._callbacks = (self._fire,)

    @classmethod
    def of(cls, network: Network) -> TimerQueue:
        """The queue of `network`'s TCP ends, made on first use."""
        queue = network.tcp_timers
        if queue is None:
            queue = network.tcp_timers = cls(network.env)
        return queue  # type: ignore[no-any-return]

    def add(self, at: float, end: TcpEndpoint) -> None:
        order = self._order = self._order + 1
        heappush(self._heap, (at, order, end))
        if at < self._wake:
            self._book(at)

    def _book(self, at: float) -> None:
        self._wake = at
        now = self.env._now
        schedule(self.env, at - now if at > now else 0.0, self._callbacks, at)

    def _fire(self, event: simpy.Event) -> None:
        if event._value != self._wake:
            return  # superseded by an earlier one
        heap = self._heap
        now = self.env._now
        self._wake = now  # while serving: what an end sets now is taken from the heap below, not booked
        due = now + _EPS
        while heap:
            at, _, end = heap[0]
            if end._wake != at:
                heappop(heap)  # stale: the end has moved its deadline since
            elif at <= due:
                heappop(heap)
                end._wake = INF
                end._on_timer(now)
            else:
                break
        self._wake = INF
        if heap:
            self._book(heap[0][0])


class TcpEndpoint:
    """One end of a connection, and the `Endpoint` the network delivers its packets to."""

    __slots__ = (
        "connection",
        "node",
        "on_message",
        "peer",
        "stats",
        "state",
        "epoch",
        "_env",
        "_network",
        "_s",
        "_timers",
        "_wake",
        "_route",
        "_mss",
        "_hdr",
        "_rto_at",
        "_tlp_at",
        "_reo_at",
        "_ack_at",
        # sender
        "snd_una",
        "snd_nxt",
        "_write_end",
        "_pending",
        "_rtx",
        "_by_seq",
        "_sacked_out",
        "_lost_out",
        "_retrans_out",
        "_to_resend",
        "cwnd",
        "_cwnd_cnt",
        "ssthresh",
        "_prior_cwnd",
        "_prr_delivered",
        "_prr_out",
        "_lost_marks",
        "_cwnd_limited",
        "_max_packets_out",
        "_cwnd_usage_seq",
        "_cubic",
        "_ca_state",
        "_recover",
        "_last_send",
        "_snd_sml",
        "_tlp_high",
        "_tlp_retrans",
        "_rack_ts",
        "_rack_end",
        "_rack_rtt",
        "srtt",
        "_mdev",
        "_mdev_max",
        "_rttvar",
        "_rtt_seq",
        "min_rtt",
        "rto",
        "backoff",
        "_syn_rtt",
        # receiver
        "rcv_nxt",
        "_ooo",
        "_ts_recent",
        "_last_ack_sent",
        "_rcv_mss",
        "_receiving",
        "_lrcvtime",
        "_quick",
        "_pingpong",
        "_ack_frame",
    )

    def __init__(self, connection: TcpConnection, node: str, on_message: Callable[[Any], None]) -> None:
        self.connection = connection
        self.node = node
        self.on_message = on_message
        self.peer: TcpEndpoint = self
        self.stats = TcpStats()
        self._env = connection.network.env
        self._network = connection.network
        self._s = connection.settings
        self._timers = connection.timers
        self._wake = INF  # the deadline this end's live entry in the timer queue has (INF: none)
        self._route: tuple[Any, ...] | None = None  # to the peer's node, looked up on the first packet
        self._mss = self._s.mss
        self._hdr = self._s.header_bytes + self._s.framing_bytes  # on every segment
        self._reset_state(ESTABLISHED)

    def _reset_state(self, state: str) -> None:
        s = self._s
        self.state = state
        self.epoch = self.connection.epoch
        self._rto_at = self._tlp_at = self._reo_at = self._ack_at = INF
        self.snd_una = self.snd_nxt = self._write_end = 0
        self._pending: deque[tuple[int, Any, FrameAccount | None]] = deque()  # written, last byte not yet sent
        self._rtx: deque[_Data] = deque()  # sent, not cumulatively acknowledged
        self._by_seq: dict[int, _Data] = {}
        self._sacked_out = self._lost_out = self._retrans_out = self._to_resend = 0
        self.cwnd = s.initial_cwnd
        self._cwnd_cnt = 0
        self.ssthresh = _NO_SSTHRESH
        self._prior_cwnd = self._prr_delivered = self._prr_out = 0  # PRR's (RFC 6937) state in recovery
        self._lost_marks = 0  # segments marked lost, ever (what one ACK newly marked: the difference)
        self._cwnd_limited = False  # tcp_cwnd_validate's latch, and the most segments out in this round trip
        self._max_packets_out = 0
        self._cwnd_usage_seq = 0
        self._cubic = _Cubic()
        self._ca_state = _OPEN
        self._recover = 0
        self._last_send = -INF
        self._snd_sml = 0  # end of the last sub-MSS segment sent (Minshall's Nagle)
        self._tlp_high = -1  # snd_nxt when the outstanding probe went; -1: none
        self._tlp_retrans = False
        self._rack_ts, self._rack_end, self._rack_rtt = -1.0, -1, 0.0
        self.srtt = 0.0  # 0: no sample yet
        self._mdev = self._mdev_max = self._rttvar = 0.0
        self._rtt_seq = 0
        self.min_rtt = INF
        self.rto = s.rto_initial_s
        self.backoff = 0
        self._syn_rtt = False  # a SYN-ACK went; the next echo of it is an RTT sample
        self.rcv_nxt = 0
        self._ooo: dict[int, _Data] = {}
        self._ts_recent = -1.0
        self._last_ack_sent = 0
        self._rcv_mss = 536  # Linux's first guess of the peer's segment size, for the every-second-segment rule
        self._receiving = False
        self._lrcvtime = 0.0
        self._quick = 0
        self._pingpong = False
        self._ack_frame: FrameAccount | None = None

    # --- the application's side -----------------------------------------------------------------------
    def send(self, message: Any, size: int, frame: FrameAccount | None = None) -> None:
        """Write `message` of `size` bytes; it reaches the peer's `on_message` once, in order."""
        if self.state == CLOSED:
            raise ConnectionError(f"TCP connection at {self.node} is closed")
        if size <= 0:
            raise ValueError("a message has at least one byte")
        now = self._env._now
        if not self._rtx and now - self._last_send > self.rto and self._s.slow_start_after_idle:
            self._restart_window(now)
        end = self._write_end = self._write_end + size
        rtx = self._rtx
        if (
            size <= self._mss
            and not self._pending
            and self.state == ESTABLISHED
            and not self._to_resend
            and len(rtx) - self._sacked_out - self._lost_out + self._retrans_out < self.cwnd
            and (size == self._mss or not rtx or self._snd_sml <= self.snd_una or not self._s.nagle)
        ):
            # The common case: all before it is sent and the window (and Nagle) let it go at once, as one
            # segment; what `_push` would do, without queueing it first.
            self._send_segment(now, end, (message,), frame, size)
            self._schedule_probe(now)
            if self._s.cwnd_latch:
                self._cwnd_validate(len(rtx) - self._sacked_out - self._lost_out + self._retrans_out >= self.cwnd)
        else:
            self._pending.append((end, message, frame))
            self._push(now)
        self._arm()

    def abort(self) -> list[Any]:
        """Drop the connection at this end (a crash, a restart): all state goes, packets for it are dropped.
        Returns the messages written here that the peer has not acknowledged, in order."""
        dropped = [m for d in self._rtx for m in d.ends] + [m for _, m, _ in self._pending]
        self._reset_state(CLOSED)
        return dropped

    @property
    def in_flight(self) -> int:
        """Segments sent and, as far as this end knows, still in the network."""
        return len(self._rtx) - self._sacked_out - self._lost_out + self._retrans_out

    @property
    def unacked_bytes(self) -> int:
        return self._write_end - self.snd_una

    # --- sending --------------------------------------------------------------------------------------
    def _push(self, now: float) -> None:
        """Send what the window allows: segments marked lost first, then new data."""
        if self.state != ESTABLISHED:
            return
        mss = self._mss
        rtx = self._rtx
        sent_new = False
        had_new = self.snd_nxt < self._write_end
        while len(rtx) - self._sacked_out - self._lost_out + self._retrans_out < self.cwnd:
            if self._to_resend:
                self._resend(self._next_lost(), now)
                continue
            left = self._write_end - self.snd_nxt
            if left <= 0:
                break
            if left >= mss:
                left = mss
            elif rtx and self._snd_sml > self.snd_una and self._s.nagle:
                break  # a small segment waits while an earlier small one is unacknowledged
            self._send_new(now, left)
            sent_new = True
        if sent_new:
            self._schedule_probe(now)
        if had_new and self._s.cwnd_latch:
            limited = len(rtx) - self._sacked_out - self._lost_out + self._retrans_out >= self.cwnd
            if sent_new or limited:
                self._cwnd_validate(limited)

    def _cwnd_validate(self, limited: bool) -> None:
        """Linux's tcp_cwnd_validate: once the window limited a send, the sender counts as window-limited
        until that window is acknowledged, so every ACK of a burst that filled it grows it; else the most
        segments out in the round trip (which slow start may double)."""
        if (
            self.snd_una >= self._cwnd_usage_seq
            or limited
            or (not self._cwnd_limited and len(self._rtx) > self._max_packets_out)
        ):
            self._cwnd_limited = limited
            self._max_packets_out = len(self._rtx)
            self._cwnd_usage_seq = self.snd_nxt

    def _send_new(self, now: float, length: int) -> None:
        end = self.snd_nxt + length
        pending = self._pending
        first = pending[0]
        if first[0] > end:
            ends = _NO_ENDS
        else:
            pending.popleft()
            if pending and pending[0][0] <= end:
                done = [first[1]]
                while pending and pending[0][0] <= end:
                    done.append(pending.popleft()[1])
                ends = tuple(done)
            else:
                ends = (first[1],)
        self._send_segment(now, end, ends, first[2], length)  # charged to the message owning the first byte

    def _send_segment(
        self, now: float, end: int, ends: tuple[Any, ...], frame: FrameAccount | None, length: int
    ) -> None:
        seq = self.snd_nxt
        data = _Data(seq, end, ends, frame, now)
        rtx = self._rtx
        if len(rtx) - self._sacked_out - self._lost_out + self._retrans_out == 0 and self._s.cubic:
            self._cubic.idle(now - self._last_send, now)
        if not rtx or self._tlp_at < INF:
            self._rto_at = now + self.rto  # from idle, or a probe was pending (Linux rearms then)
        rtx.append(data)
        self._by_seq[seq] = data
        self.snd_nxt = end
        if length < self._mss:
            self._snd_sml = end
        self._last_send = now
        if self._receiving and now - self._lrcvtime < self._s.delayed_ack_s:
            self._pingpong = True  # an answer: our ACKs can wait for the next one
        self._transmit(data, now)

    def _resend(self, data: _Data, now: float) -> None:
        data.retrans = True
        self._retrans_out += 1
        self._to_resend -= 1
        if self._ca_state == _LOSS:
            self.stats.retransmits_rto += 1
        else:
            self.stats.retransmits_fast += 1
        self._retransmit(data, now)

    def _retransmit(self, data: _Data, now: float) -> None:
        data.transmissions += 1
        data.sent_at = now
        self._transmit(data, now)

    def _next_lost(self) -> _Data:
        for data in self._rtx:
            if data.lost and not data.retrans:
                return data
        raise AssertionError("a segment is counted lost but none is marked")

    def _transmit(self, data: _Data, now: float) -> None:
        length = data.end - data.seq
        rcv_nxt = self.rcv_nxt
        segment = TcpSegment(self.epoch, data.seq, data, now, rcv_nxt, self._ts_recent)
        if rcv_nxt > self._last_ack_sent:  # every segment acknowledges rcv_nxt (as `_ack_sent`)
            if self._quick:
                self._quick -= 1
            self._last_ack_sent = rcv_nxt
        self._ack_at = INF
        if self._ca_state == _RECOVERY:
            self._prr_out += 1
        stats = self.stats
        stats.segments_sent += 1
        stats.bytes_sent += length
        self._emit(self._hdr + length, segment, data.frame)

    def _send_ack(self, now: float, sack: int = -1, sack_ts: float = -1.0, dsack: bool = False) -> None:
        size = self._hdr
        if sack >= 0 or dsack or self._ooo:
            size += self._s.sack_bytes
        rcv_nxt = self.rcv_nxt
        segment = TcpSegment(self.epoch, self.snd_nxt, None, now, rcv_nxt, self._ts_recent, sack, sack_ts, dsack)
        if rcv_nxt > self._last_ack_sent:  # every segment acknowledges rcv_nxt: no delayed ACK is due
            if self._quick:
                self._quick -= 1
            self._last_ack_sent = rcv_nxt
        self._ack_at = INF
        self.stats.acks_sent += 1
        self._emit(size, segment, self._ack_frame)

    def _emit(self, size: int, segment: TcpSegment, frame: FrameAccount | None) -> None:
        self.stats.wire_bytes += size
        peer = self.peer
        route = self._route
        if route is None:
            if self.node == peer.node:
                # Loopback: the network would hand it over inside this call; a zero delay keeps ends apart.
                schedule(self._env, 0.0, _LOOPBACK, Packet(self, peer, size, segment, frame))
                return
            route = self._route = self._network.route(self.node, peer.node)
        self._network.transmit(Packet(self, peer, size, segment, frame, route))

    def _send_syn(self, kind: int, now: float) -> None:
        s = self._s
        segment = TcpSegment(self.epoch, 0, None, now, 0, self._ts_recent, syn=kind)
        self._emit(s.syn_bytes + s.framing_bytes, segment, None)

    def _send_rst(self, now: float) -> None:
        s = self._s
        segment = TcpSegment(self.epoch, 0, None, now, 0, -1.0, rst=True)
        self._emit(s.rst_bytes + s.framing_bytes, segment, None)

    # --- receiving ------------------------------------------------------------------------------------
    def receive(self, packet: Packet) -> None:
        segment: TcpSegment = packet.message
        if segment.epoch != self.epoch or self.state == CLOSED:
            self._network.drop(packet, "tcp_closed", None)  # for a connection that no longer exists
            return
        now = self._env._now
        if segment.rst:
            if self.state == SYN_SENT:  # refused: nobody listens at the other end
                self._reset_state(CLOSED)
                refused = self.connection.on_refused
                if refused is not None:
                    refused()
            return
        if segment.syn:
            self._on_syn(segment, now)
            self._arm()
            return
        state = self.state
        if state != ESTABLISHED:
            if state == SYN_SENT or state == LISTEN:
                return
            if state == SYN_RCVD:
                self.state = ESTABLISHED
        if self._syn_rtt and segment.tsecr >= 0.0:
            self._syn_rtt = False
            self._rtt_sample(now - segment.tsecr)
        if segment.seq <= self._last_ack_sent and segment.tsval >= self._ts_recent:
            self._ts_recent = segment.tsval  # RFC 7323: echo the segment that the next ACK covers first
        if self._rtx or segment.ack > self.snd_una or segment.sack >= 0 or self._tlp_high >= 0:
            self._on_ack(segment, now)  # else nothing of ours is out and nothing is new: data after idle
        data = segment.data
        if data is not None:
            self._on_data(segment, data, now)
        # Send what the ACK let out, unless the application reset the connection (or there is nothing).
        if self.epoch == segment.epoch and (self._to_resend or self.snd_nxt < self._write_end):
            self._push(now)
        self._arm()

    def _on_syn(self, segment: TcpSegment, now: float) -> None:
        if segment.syn == _SYN:
            if self.state == LISTEN:
                accepting = self.connection.accepting
                if accepting is not None and not accepting():
                    self._send_rst(now)
                    return
                self.state = SYN_RCVD
            if self.state == SYN_RCVD:  # also a SYN again: our SYN-ACK was lost
                self._ts_recent = segment.tsval
                self._syn_rtt = True
                self._send_syn(_SYNACK, now)
            return
        if self.state == SYN_SENT:
            self._ts_recent = segment.tsval
            self._rtt_sample(now - segment.tsecr)
            self.state = ESTABLISHED
            self._rto_at = INF
            self._send_ack(now)
            self._push(now)
        elif self.state == ESTABLISHED:
            self._send_ack(now)  # a SYN-ACK again: our ACK was lost

    def _on_data(self, segment: TcpSegment, data: _Data, now: float) -> None:
        s = self._s
        self._ack_frame = data.frame
        start = self.rcv_nxt
        seq, end = data.seq, data.end
        ooo = self._ooo
        if end <= start or seq in ooo:
            # A duplicate: our ACK may have been lost. Say so at once (D-SACK), and ACK quickly for a while.
            self.stats.duplicates_received += 1
            self._quick = max(self._quick, s.quickacks)
            self._pingpong = False
            self._send_ack(now, seq if seq > start else -1, segment.tsval, dsack=True)
            return
        if seq > start:  # a hole before it: hold it, and tell the sender at once
            ooo[seq] = data
            self._send_ack(now, seq, segment.tsval)
            return
        # In order. Linux's quick-ACK bookkeeping (tcp_event_data_recv).
        if not self._receiving:
            self._receiving = True
            self._quick = s.quickacks
        elif now - self._lrcvtime > self.rto:
            self._quick = max(self._quick, s.quickacks)
        self._lrcvtime = now
        if end - seq > self._rcv_mss:
            self._rcv_mss = min(end - seq, s.mss)
        ready: Any = data.ends
        if ooo:
            ready = list(ready)
            while ooo:
                held = ooo.pop(end, None)
                if held is None:
                    break
                end = held.end
                ready.extend(held.ends)
            self.rcv_nxt = end
            self.stats.bytes_delivered += end - start
            self._send_ack(now)  # a hole filled: at once
        else:
            self.rcv_nxt = end
            self.stats.bytes_delivered += end - start
            # ACK now or later; decided before the application answers, so a delayed ACK rides on its answer.
            if (self._quick and not self._pingpong) or end - self._last_ack_sent > self._rcv_mss:
                self._send_ack(now)
            elif self._ack_at == INF:
                self._ack_at = now + s.delayed_ack_s
        if len(ready) == 1:
            self.stats.messages_delivered += 1
            self.on_message(ready[0])
            return
        epoch = self.epoch
        stats = self.stats
        for message in ready:
            stats.messages_delivered += 1
            self.on_message(message)
            if self.epoch != epoch:
                return

    def _on_ack(self, segment: TcpSegment, now: float) -> None:
        ack = segment.ack
        rtx = self._rtx
        prior_out = len(rtx)
        prior_in_flight = prior_out - self._sacked_out - self._lost_out + self._retrans_out
        delivered = 0
        advanced = ack > self.snd_una
        if advanced:
            by_seq = self._by_seq
            while rtx and rtx[0].end <= ack:
                data = rtx.popleft()
                del by_seq[data.seq]
                if data.sacked:
                    self._sacked_out -= 1
                    continue
                delivered += 1
                if data.lost:
                    self._unmark(data)
                # RACK needs the send time of the delivered copy: unambiguous unless it was resent (as
                # `_rack_advance`, inline: this runs for every segment acknowledged).
                sent_at = data.sent_at if data.transmissions == 1 else segment.tsecr
                if sent_at >= 0.0 and (
                    sent_at > self._rack_ts or (sent_at == self._rack_ts and data.end > self._rack_end)
                ):
                    self._rack_ts, self._rack_end, self._rack_rtt = sent_at, data.end, now - sent_at
            self.snd_una = ack
            if segment.tsecr >= 0.0:
                self._rtt_sample(now - segment.tsecr)
                if self._s.cubic:
                    self._cubic.acked(now - segment.tsecr, now)
            if self._ca_state != _OPEN and ack >= self._recover:
                if self._ca_state == _RECOVERY and self._s.prr:
                    self.cwnd = self.ssthresh  # the reduction ends at ssthresh (tcp_end_cwnd_reduction)
                self._ca_state = _OPEN
            elif self._ca_state == _RECOVERY and rtx and not rtx[0].sacked and not rtx[0].lost:
                self._mark_lost(rtx[0])  # NewReno: a partial ACK shows the next hole
        elif segment.data is None and rtx and ack == self.snd_una:
            self.stats.dup_acks += 1
        if segment.sack >= 0:
            delivered += self._on_sack(segment.sack, segment.sack_ts, now)
        if self._tlp_high >= 0 and ack >= self._tlp_high:
            self._on_probe_acked(segment, ack, advanced)
        lost_marks = self._lost_marks
        if rtx and (self._sacked_out or self._ca_state != _OPEN):
            self._detect_losses(now)
        if self._ca_state == _RECOVERY:
            if self._s.prr:
                self._prr(delivered, self._lost_marks - lost_marks, advanced)
        elif advanced and delivered:
            # Grow on cumulative progress only (SACKs alone do not, as in Linux), and only a window that
            # limits (tcp_is_cwnd_limited): idle senders do not earn a large one.
            if self._s.cwnd_latch:
                limited = self._cwnd_limited or (self.cwnd < self.ssthresh and self.cwnd < 2 * self._max_packets_out)
            else:
                limited = prior_in_flight >= self.cwnd or (self.cwnd < self.ssthresh and self.cwnd < 2 * prior_out)
            if limited:
                self._grow(delivered, now)
        if advanced:
            self._tlp_at = INF
            if rtx:
                self._rto_at = now + self.rto
                self._schedule_probe(now)
            else:
                self._rto_at = INF

    def _on_sack(self, seq: int, sent_at: float, now: float) -> int:
        data = self._by_seq.get(seq)
        if data is None or data.sacked:
            return 0
        self._unmark(data)
        data.sacked = True
        self._sacked_out += 1
        self._rack_advance(sent_at, data.end, now)
        return 1

    def _unmark(self, data: _Data) -> None:
        """`data` was delivered: it is no longer lost or being resent."""
        if data.lost:
            data.lost = False
            self._lost_out -= 1
            if data.retrans:
                data.retrans = False
                self._retrans_out -= 1
            else:
                self._to_resend -= 1

    def _mark_lost(self, data: _Data) -> None:
        if data.sacked:
            return
        if not data.lost:
            data.lost = True
            self._lost_out += 1
            self._to_resend += 1
            self._lost_marks += 1
        elif data.retrans:  # the retransmission was lost too
            data.retrans = False
            self._retrans_out -= 1
            self._to_resend += 1
            self._lost_marks += 1

    def _detect_losses(self, now: float) -> None:
        s = self._s
        rtx = self._rtx
        if self._sacked_out >= s.dupthresh and not rtx[0].lost and not rtx[0].sacked:
            self._mark_lost(rtx[0])  # fast retransmit: three duplicate ACKs
        if s.rack and self._rack_ts >= 0.0:
            self._rack_detect(now)
        if self._to_resend and self._ca_state == _OPEN:
            self._enter_recovery(now)

    def _rack_advance(self, sent_at: float, end: int, now: float) -> None:
        """Remember the most recently sent segment known delivered, and its RTT."""
        if sent_at < 0.0:
            return  # no echo to tell which copy arrived
        if sent_at > self._rack_ts or (sent_at == self._rack_ts and end > self._rack_end):
            self._rack_ts, self._rack_end, self._rack_rtt = sent_at, end, now - sent_at

    def _rack_detect(self, now: float) -> None:
        """RFC 8985: a segment sent before a delivered one is lost once RTT + the reordering window passed."""
        reo = 0.0
        if self._ca_state == _OPEN and self._sacked_out < self._s.dupthresh and self.min_rtt < INF:
            reo = self.min_rtt / 4.0
        rack_ts, rack_end = self._rack_ts, self._rack_end
        wait = INF
        for data in self._rtx:
            if data.sacked or (data.lost and not data.retrans):
                continue
            if data.sent_at > rack_ts or (data.sent_at == rack_ts and data.end >= rack_end):
                continue  # sent after the latest delivered one: no evidence yet
            left = data.sent_at + self._rack_rtt + reo - now
            if left <= _EPS:
                self._mark_lost(data)
            elif left < wait:
                wait = left
        self._reo_at = now + wait if wait < INF else INF

    def _enter_recovery(self, now: float) -> None:
        s = self._s
        self._ca_state = _RECOVERY
        self._recover = self.snd_nxt
        ssthresh = self._reduced()
        self._cwnd_cnt = 0
        self._tlp_at = INF
        self.stats.fast_recoveries += 1
        if s.prr:
            # The window comes down as ACKs report deliveries (`_prr`); the first lets the fast retransmit go.
            self.ssthresh = ssthresh
            self._prior_cwnd = self.cwnd
            self._prr_delivered = self._prr_out = 0
            return
        self.ssthresh = self.cwnd = ssthresh
        self._resend(self._next_lost(), now)  # the fast retransmit goes now, whatever the window

    def _reduced(self) -> int:
        """ssthresh after a loss: beta of the window (CUBIC's, which also remembers the window as W_max)."""
        s = self._s
        if s.cubic:
            return self._cubic.ssthresh(self.cwnd, s.beta)
        return max(2, int(self.cwnd * s.beta))

    def _prr(self, newly: int, newly_lost: int, advanced: bool) -> None:
        """Proportional rate reduction (RFC 6937, Linux's tcp_cwnd_reduction) for an ACK in recovery that
        reported `newly` segments delivered: while more than ssthresh is in flight, send ssthresh / prior
        window of what was delivered; below it, as much as was delivered (one more on cumulative progress
        with no new loss), up to ssthresh. At least one segment (the fast retransmit) on entering."""
        if newly <= 0:
            return
        self._prr_delivered += newly
        in_flight = len(self._rtx) - self._sacked_out - self._lost_out + self._retrans_out
        delta = self.ssthresh - in_flight
        if delta < 0:
            sndcnt = (self.ssthresh * self._prr_delivered + self._prior_cwnd - 1) // self._prior_cwnd - self._prr_out
        else:
            sndcnt = max(self._prr_delivered - self._prr_out, newly)
            if advanced and not newly_lost:
                sndcnt += 1
            sndcnt = min(delta, sndcnt)
        sndcnt = max(sndcnt, 0 if self._prr_out else 1)
        self.cwnd = in_flight + sndcnt

    def _on_probe_acked(self, segment: TcpSegment, ack: int, advanced: bool) -> None:
        """Linux's TLP loss detection: a probe that repaired a loss reduces the window as a fast recovery."""
        if not self._tlp_retrans or segment.dsack:
            self._tlp_high = -1  # new data, or the original arrived as well: no loss
        elif ack > self._tlp_high:
            self._tlp_high = -1
            self.ssthresh = self.cwnd = self._reduced()
            self._cwnd_cnt = 0
        elif not advanced and segment.data is None and segment.sack < 0:
            self._tlp_high = -1  # a pure duplicate ACK: both copies arrived

    def _grow(self, acked: int, now: float) -> None:
        if self.cwnd < self.ssthresh:  # slow start
            grown = min(self.cwnd + acked, self.ssthresh)
            acked -= grown - self.cwnd
            self.cwnd = grown
            if acked <= 0:
                return
        s = self._s
        if not s.cubic:
            self._cwnd_cnt += acked  # Reno: one segment per window acknowledged
            if self._cwnd_cnt >= self.cwnd:
                step = self._cwnd_cnt // self.cwnd
                self._cwnd_cnt -= step * self.cwnd
                self.cwnd += step
            return
        per = self._cubic.update(self.cwnd, acked, now, s.beta)  # one segment per `per` acknowledged
        if self._cwnd_cnt >= per:  # credit earned at a larger `per`: one segment, gently (tcp_cong_avoid_ai)
            self._cwnd_cnt = 0
            self.cwnd += 1
        self._cwnd_cnt += acked
        if self._cwnd_cnt >= per:
            step = self._cwnd_cnt // per
            self._cwnd_cnt -= step * per
            self.cwnd += step

    def _restart_window(self, now: float) -> None:
        """Idle for longer than the RTO: the window no longer reflects the path (RFC 5681 4.1, Linux's)."""
        if self._ca_state == _OPEN:
            self.ssthresh = max(self.ssthresh, self.cwnd * 3 // 4)
        restart = min(self._s.initial_cwnd, self.cwnd)
        cwnd = self.cwnd
        idle = now - self._last_send - self.rto
        while idle > 0 and cwnd > restart:
            cwnd >>= 1
            idle -= self.rto
        self.cwnd = max(cwnd, restart)

    def _rtt_sample(self, rtt: float) -> None:
        """Linux's tcp_rtt_estimator and tcp_set_rto (see the module docstring)."""
        s = self._s
        if rtt < 1e-6:
            rtt = 1e-6
        if rtt < self.min_rtt:
            self.min_rtt = rtt
        if self.srtt == 0.0:
            self.srtt = rtt
            self._mdev = 2.0 * rtt  # 4 * mdev, mdev = rtt / 2
            self._rttvar = self._mdev_max = max(self._mdev, s.rto_min_s)
            self._rtt_seq = self.snd_nxt
        else:
            srtt = self.srtt
            err = rtt - srtt
            self.srtt = srtt + err / 8.0
            mdev = self._mdev
            if err < 0.0:
                change = -err - mdev / 4.0
                if change > 0.0:
                    change /= 8.0  # a falling RTT barely raises the deviation (Linux's Eifel-like rule)
            else:
                change = err - mdev / 4.0
            mdev = self._mdev = mdev + change
            if mdev > self._mdev_max:
                self._mdev_max = mdev
                if mdev > self._rttvar:
                    self._rttvar = mdev
            if self.snd_una > self._rtt_seq:  # once per RTT the variance term decays toward its recent max
                if self._mdev_max < self._rttvar:
                    self._rttvar -= (self._rttvar - self._mdev_max) / 4.0
                self._rtt_seq = self.snd_nxt
                self._mdev_max = s.rto_min_s
        rto = self.srtt + self._rttvar
        self.rto = rto if rto < s.rto_max_s else s.rto_max_s
        self.backoff = 0

    # --- timers ---------------------------------------------------------------------------------------
    def _schedule_probe(self, now: float) -> None:
        """Arm the tail loss probe (Linux's tcp_schedule_loss_probe), never later than the RTO."""
        if not self._s.tail_loss_probe or not self._rtx or self._ca_state != _OPEN or self._sacked_out:
            return
        if self.srtt:
            pto = 2.0 * self.srtt + (self._s.rto_min_s if len(self._rtx) == 1 else 0.002)
        else:
            pto = self._s.rto_initial_s
        self._tlp_at = min(now + pto, self._rto_at)

    def _arm(self) -> None:
        at = self._rto_at
        if self._tlp_at < at:
            at = self._tlp_at
        if self._reo_at < at:
            at = self._reo_at
        if self._ack_at < at:
            at = self._ack_at
        if at != self._wake:
            self._wake = at  # an entry for an earlier or later deadline is stale from now on
            if at < INF:
                self._timers.add(at, self)

    def _on_timer(self, now: float) -> None:
        """The timer queue: this end's earliest deadline is due."""
        due = now + _EPS
        if self._ack_at <= due:
            self._ack_at = INF
            if self.rcv_nxt > self._last_ack_sent:
                self._pingpong = False  # no answer came to carry it
                self._send_ack(now)
        if self._reo_at <= due:
            self._reo_at = INF
            if self._rtx:
                state = self._ca_state
                self._detect_losses(now)
                if state != _RECOVERY and self._ca_state == _RECOVERY and self._s.prr:
                    self._prr(1, 0, False)  # as Linux's tcp_rack_reo_timeout: one delivery's worth
                self._push(now)
        if self._tlp_at <= due:
            self._tlp_at = INF
            self._probe(now)
        if self._rto_at <= due:
            self._rto_at = INF
            self._timeout(now)
        self._arm()

    def _probe(self, now: float) -> None:
        if not self._rtx:
            return
        if self._tlp_high < 0 and not self._sacked_out:  # one probe at a time, and only with no loss in sight
            if self.snd_nxt < self._write_end:  # new data goes as the probe, whatever the window says
                self._send_new(now, min(self._s.mss, self._write_end - self.snd_nxt))
                self._tlp_retrans = False
                if self._s.cwnd_latch:
                    self._cwnd_validate(self.in_flight >= self.cwnd)
            else:
                self._tlp_retrans = True
                self.stats.retransmits_tlp += 1
                self._retransmit(self._rtx[-1], now)
            self._tlp_high = self.snd_nxt
        self._rto_at = now + self.rto

    def _timeout(self, now: float) -> None:
        s = self._s
        if self.state == SYN_SENT:
            self.stats.timeouts += 1
            self.stats.retransmits_rto += 1
            self._send_syn(_SYN, now)
        elif self._rtx:
            self.stats.timeouts += 1
            if self._ca_state == _OPEN or self.snd_una >= self._recover:
                self.ssthresh = self._reduced()
            if s.cubic:
                self._cubic.reset()  # entering Loss forgets CUBIC's state, W_max too (bictcp_state)
            self.cwnd = 1
            self._cwnd_cnt = 0
            for data in self._rtx:
                self._mark_lost(data)
            self._ca_state = _LOSS
            self._recover = self.snd_nxt
            self._tlp_at = self._reo_at = INF
            self._tlp_high = -1
            self._push(now)  # resends the first segment
        else:
            return
        self.backoff += 1
        self.rto = min(self.rto * 2.0, s.rto_max_s)
        self._rto_at = now + self.rto


def _loopback(event: simpy.Event) -> None:
    packet: Packet = event._value
    packet.receiver.receive(packet)


_LOOPBACK = (_loopback,)


class TcpConnection:
    """A TCP connection between end `a` on `a_node` and end `b` on `b_node` of `network`.

    `a.send(m, size)` delivers `m` to `on_message_b`, and `b.send` to `on_message_a`. The connection starts
    established with no RTT sample (the first RTO is 1 s); `open()` starts it again with a handshake from
    `a`. `reset()` or an end's `abort()` closes it; packets of a closed or earlier incarnation are dropped
    with reason "tcp_closed". Set `accepting` (is anything listening at `b`?) and `on_refused` (called when
    `b` refused `a`'s SYN) to model a server that is down.
    """

    def __init__(
        self,
        network: Network,
        a_node: str,
        b_node: str,
        on_message_a: Callable[[Any], None] = _discard,
        on_message_b: Callable[[Any], None] = _discard,
        settings: TcpSettings | None = None,
    ) -> None:
        self.network = network
        self.settings = settings if settings is not None else TcpSettings()
        self.timers = TimerQueue.of(network)
        self.epoch = 0
        self.a = TcpEndpoint(self, a_node, on_message_a)
        self.b = TcpEndpoint(self, b_node, on_message_b)
        self.a.peer, self.b.peer = self.b, self.a
        self.accepting: Callable[[], bool] | None = None
        self.on_refused: Callable[[], None] | None = None

    def open(self) -> tuple[list[Any], list[Any]]:
        """A new incarnation: both ends start afresh and `a` sends a SYN; data written to `a` before the
        SYN-ACK arrives waits. Returns what each end dropped (as `reset`)."""
        dropped = self.reset()
        self.a._reset_state(SYN_SENT)
        self.b._reset_state(LISTEN)
        self.a._send_syn(_SYN, self.network.env.now)
        self.a._rto_at = self.network.env.now + self.a.rto
        self.a._arm()
        return dropped

    def reset(self) -> tuple[list[Any], list[Any]]:
        """Close both ends at once; returns the messages each had written and not had acknowledged."""
        self.epoch += 1
        return self.a.abort(), self.b.abort()

    @property
    def established(self) -> bool:
        return self.a.state == ESTABLISHED and self.b.state == ESTABLISHED

    @property
    def stats(self) -> tuple[TcpStats, TcpStats]:
        return self.a.stats, self.b.stats
