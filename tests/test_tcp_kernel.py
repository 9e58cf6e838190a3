"""The TCP model (`iotbed.sim.tcp`) against the kernel's TCP (`iotbed.emulation.tcp_validation`) at 1% loss.

The workload: 3,000 messages of 1,118 bytes (a digits frame with its MQTT headers), 100 a second, over one
connection with Nagle on; the path: 10 Mbit/s and 10 ms each way, 1% of data packets lost (nftables in the
kernel, `BernoulliLoss` in the model; ACKs are not lost here: see below). The kernel runs once (30 s of
traffic); the model runs at the kernel run's send times with 40 seeds (a fraction of a second each), so its
figures are known with their scatter. The kernel's figure is one draw; it must lie within:

- p50: the model's median p50 +-1.5 ms. About 5% of messages are behind a loss, so the median message is
  not: it is held by Nagle until the ACK of the segment before it comes back, so its latency is bound to the
  round trip, which both sides put on the same link (the relay is the model's `Transmitter` packet for
  packet). The model's p50 does not move with the seed (spread 0.01 ms). What the kernel adds is the
  relay's and the receiver's wake-ups, 0.1-0.3 ms per pass (SCHED_FIFO; the largest lateness seen was
  1 ms): measured +0.3 ms.
- p99: set by the messages behind a loss: the repair (RACK, about one RTT after the hole plus the
  reordering window min_rtt/4, here 25-45 ms) plus the Nagle hold behind it. Sampling: the 30 messages above
  the p99 come in clusters of about three (the messages written during one repair) from about 30 losses,
  so their count varies by about sqrt(30 * 3) = 9.5, a third of a percentile point; where the latency
  distribution falls off by 10-15 ms per point that is +-3-5 ms. The test measures it instead of assuming
  it: sigma = half the 16-84% range of the model's p99 over its seeds (about 4 ms), and allows 3 sigma
  either way. On top, above only, what the kernel does later than the model by design, per repair:
  (a) its reordering timer is `usecs_to_jiffies(remaining + 2 ms)` (TCP_TIMEOUT_MIN_US, Linux 6.6+) and
  fires on a tick, so 2 ms plus up to one jiffy (4 ms at HZ=250) later than the model's exact timer;
  (b) Linux's RACK takes its RTT from the last segment an ACK delivered, not the most recently sent one
  (RFC 8985, as the model): when an ACK both cumulatively acknowledges a segment the receiver had held for
  its delayed ACK and SACKs one behind the hole, that RTT includes the ACK delay, the reordering timer comes
  out 10-15 ms long, and the repair often waits for the next ACK, one message interval (10 ms) later.
  So the kernel may be up to 2 ms + 1 jiffy + 1/rate later. Measured: model median 46.4 ms, kernel
  52.2-52.6 ms in three runs.

ACKs are not lost in this test: with lost ACKs the kernel ends some repairs in an RTO (PRR sends new data
only as ACKs return, so a lost retransmission whose one later SACK is lost stalls it; the model, cutting the
window to 0.7 at once, keeps sending and repairs by RACK), about one run in eight at 1%, which puts ~25
messages 200+ ms late and moves a p99 of 3,000 by 20-30 ms. The benchmark (`benchmarks/tcp_validation.py`)
shows those rows.

Needs root, `ip netns` and `nft`; skipped with the reason otherwise. The model-only test runs everywhere.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from iotbed.emulation import tcp_validation as tv

PATH = tv.PathSpec(bandwidth_bps=10e6, delay_s=0.010, loss=0.01, ack_loss=False)
WORKLOAD = tv.Workload(message_bytes=1118, rate_hz=100.0, count=3000)
SEEDS = 40
P50_ALLOWANCE_S = 0.0015  # the relay's and the receiver's wake-ups (see the module docstring)
SIGMAS = 3.0


def _kernel_skip_reason() -> str | None:
    reason = tv.kernel_unavailable()
    if reason is not None:
        return reason
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def comparison() -> tv.Comparison:
    reason = _kernel_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return tv.compare(PATH, WORKLOAD, seeds=SEEDS)


def test_model_side_alone_delivers_everything_in_order() -> None:
    """No kernel needed: the harness's simulated side on a short workload."""
    workload = tv.Workload(count=300, rate_hz=100.0)
    result = tv.simulate(PATH, workload, seed=3)
    assert result.delivered == 300 and result.in_order
    floor = PATH.delay_s + (workload.message_bytes + 52 + tv.FRAMING_BYTES) * 8 / PATH.bandwidth_bps
    assert min(result.latencies_s) >= floor - 1e-9
    assert result.retransmissions >= result.counters["dropped_data"] > 0


def test_every_message_arrives_once_and_in_order(comparison: tv.Comparison) -> None:
    kernel = comparison.kernel
    assert kernel.sent == kernel.delivered == WORKLOAD.count and kernel.in_order
    assert all(s.delivered == WORKLOAD.count and s.in_order for s in comparison.sims)
    assert kernel.counters["dropped_data"] > 0 and kernel.retransmissions >= kernel.counters["dropped_data"]


def _timed(comparison: tv.Comparison) -> None:
    if comparison.kernel.counters["realtime"] != 1:
        pytest.skip("SCHED_FIFO was refused: waiting for a CPU would count as network latency")


def test_p50_matches_the_kernel(comparison: tv.Comparison) -> None:
    _timed(comparison)
    sim = comparison.sim_percentile(50)
    spread = comparison.sim_percentile(50, 84) - comparison.sim_percentile(50, 16)
    kernel = comparison.kernel.percentile(50)
    allowed = SIGMAS * spread / 2 + P50_ALLOWANCE_S
    assert abs(kernel - sim) <= allowed, (
        f"p50 kernel {kernel * 1e3:.2f} ms, model {sim * 1e3:.2f} +- {allowed * 1e3:.2f}"
    )


def test_p99_matches_the_kernel(comparison: tv.Comparison) -> None:
    _timed(comparison)
    sim = comparison.sim_percentile(99)
    sigma = (comparison.sim_percentile(99, 84) - comparison.sim_percentile(99, 16)) / 2
    hz = tv.kernel_hz() or 100  # unknown: the coarsest tick in use
    later = 0.002 + 1.0 / hz + 1.0 / WORKLOAD.rate_hz  # (a) timer floor and tick, (b) RACK's RTT sample
    kernel = comparison.kernel.percentile(99)
    low, high = sim - SIGMAS * sigma, sim + SIGMAS * sigma + later
    assert low <= kernel <= high, (
        f"p99 kernel {kernel * 1e3:.1f} ms, model {sim * 1e3:.1f} ms (sigma {sigma * 1e3:.1f}), "
        f"allowed [{low * 1e3:.1f}, {high * 1e3:.1f}]"
    )


def test_nothing_is_left_behind(comparison: tv.Comparison) -> None:
    assert tv.namespaces_of() == []


def test_namespaces_go_on_an_exception_and_stale_ones_are_removed() -> None:
    reason = _kernel_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="inside"):
        with tv.KernelPath(PATH):
            assert len(tv.namespaces_of()) == 3
            raise RuntimeError("inside")
    assert tv.namespaces_of() == []
    # a namespace left by a run that was killed outright (its process is gone) goes at the next start
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{tv.PREFIX}{gone.pid}-tv0snd"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in tv.remove_stale()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
    assert not os.path.exists(f"/run/netns/{stale}")
