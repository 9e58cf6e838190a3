"""The frames a server node (an edge server, a cloud) has received and not yet classified, and when its next
batch goes: as soon as it is full, or when its oldest frame has waited `max_wait_s`."""

from __future__ import annotations

from collections import deque
from collections.abc import Generator

import simpy

from iotbed.nodes.payloads import Frame
from iotbed.sim.trace import FrameRecord


class FrameBatcher:
    def __init__(self, env: simpy.Environment, max_batch: int, max_wait_s: float) -> None:
        self.env = env
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: deque[tuple[Frame, FrameRecord, float]] = deque()  # and when each arrived (simulated)
        self._wake: simpy.Event = env.event()

    def add(self, frame: Frame, record: FrameRecord) -> None:
        self._pending.append((frame, record, self.env.now))
        # Wake the server for the first frame of a batch, or when the batch is full; not for every frame.
        if not self._wake.triggered and (len(self._pending) == 1 or len(self._pending) >= self.max_batch):
            self._wake.succeed()

    def next_batch(self) -> Generator[simpy.Event, object, list[tuple[Frame, FrameRecord]]]:
        """Wait for the next batch and take it: (frame, record) pairs in arrival order."""
        env = self.env
        if not self._pending:
            self._wake = env.event()
            yield self._wake
        deadline = self._pending[0][2] + self.max_wait_s
        if len(self._pending) < self.max_batch and env.now < deadline:
            self._wake = env.event()
            yield self._wake | env.timeout(deadline - env.now)
        taken = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]
        return [(frame, record) for frame, record, _ in taken]
