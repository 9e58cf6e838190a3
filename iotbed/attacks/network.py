"""Attackers inside the running system: compromised cameras and men in the middle on a link.

Both send, for the dataset image a frame shows, the adversarial version crafted before the run
(`iotbed.attacks.crafting`). A compromised camera captures it instead of the real image, so its codec then
drops pixels of the adversarial image as usual. A man in the middle sees frames as they cross a link and
adds the crafted perturbation to the pixels that travel: for a pixel-dropped frame only the kept ones
(the dropped ones are not on the wire). Each attacker acts from `start` to `stop`, on a `fraction` of the
frames, drawn from its own random stream. Frames it changes carry its label in the trace's `attack` column.
The man in the middle's perturbation is `tamper_frame`, which the live proxy in `iotbed.emulation.mitm`
shares, so a live run changes a frame's pixels as a simulated one does (then rounded to the wire's 8 bits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from iotbed.broker.messages import Publish
from iotbed.nodes.payloads import Frame
from iotbed.sim.network import Packet
from iotbed.sim.tcp import TcpSegment


def join_labels(existing: str, label: str) -> str:
    return f"{existing}+{label}" if existing else label


@dataclass
class AttackWindow:
    """When and how often one attacker acts, and the adversarial images it sends."""

    label: str
    start_s: float
    stop_s: float
    fraction: float
    rng: np.random.Generator
    adversarial: np.ndarray  # float32 (N, C, H, W), one per dataset image
    clean: np.ndarray  # float32 (N, C, H, W), the images the cameras capture
    frames_attacked: int = 0

    def strikes(self, now: float) -> bool:
        """Whether the frame at hand is attacked: inside the window, and drawn into the fraction."""
        if not self.start_s <= now < self.stop_s:
            return False
        return self.fraction >= 1.0 or bool(self.rng.random() < self.fraction)


def already_tampered(frame: Frame, window: AttackWindow) -> bool:
    """Whether `window`'s attacker already changed this frame (a retransmission carries its label)."""
    return window.label in frame.attack.split("+")


def tamper_frame(frame: Frame, window: AttackWindow) -> Frame:
    """The frame as the man in the middle forwards it: (adversarial - clean) added to the travelling pixels,
    clipped to [0, 1], the dropped pixels of a pixel-dropped frame left as they were, the label joined.

    Pure apart from caching `frame`'s drop mask: draws no random number and counts nothing, so the simulated
    hook and the live proxy (`iotbed.emulation.mitm`) decide with `AttackWindow.strikes` and share this."""
    i = frame.image_index
    base = frame.pixels if frame.pixels is not None else window.clean[i]
    tampered = np.clip(base + (window.adversarial[i] - window.clean[i]), 0.0, 1.0).astype(np.float32)
    mask = frame.drop_mask()
    if mask is not None:
        tampered[:, mask] = base[:, mask]  # dropped pixels are not on the wire
    return dataclasses.replace(frame, pixels=tampered, attack=join_labels(frame.attack, window.label))


class ManInTheMiddle:
    """Installed as a link direction's `tamper` hook: changes frames as they arrive over that link. Over TCP a
    message is changed as the segment that carries its last byte crosses (the receiver has all of it then)."""

    def __init__(self, window: AttackWindow, now: Callable[[], float]) -> None:
        self.window = window
        self._now = now

    def __call__(self, packet: Packet) -> None:
        message = packet.message
        if type(message) is TcpSegment:
            for carried in message.messages:
                self._tamper(carried, carried.record if isinstance(carried, Publish) else None)
            return
        self._tamper(message, packet.frame)

    def _tamper(self, message: object, record: object) -> None:
        if not isinstance(message, Publish) or not isinstance(message.payload, Frame):
            return
        frame = message.payload
        window = self.window
        if already_tampered(frame, window) or not window.strikes(self._now()):
            return  # a retransmission of a frame already changed here is not changed twice
        message.payload = tampered = tamper_frame(frame, window)
        window.frames_attacked += 1
        if record is not None:
            record.attack = tampered.attack  # type: ignore[attr-defined]
