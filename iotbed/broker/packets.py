"""MQTT control packets: their types and their exact encoded sizes.

Sizes follow the MQTT 3.1.1 and MQTT 5.0 encodings: a fixed header (one byte of type and flags plus the
Remaining Length varint), then the variable header and payload. The simulator counts these bytes on every
link, so a frame's cost on the wire is what a real client would send.
"""

from __future__ import annotations

import enum
import math
import struct

MQTT311 = "mqtt311"
MQTT5 = "mqtt5"

# TCP (20 B) + IPv4 (20 B) headers per segment; a 1460-byte MSS fits a 1500-byte Ethernet MTU. What the live
# runtime's in-process shaper and the `transport: udp` simulation charge per message. The simulated TCP
# connections (`iotbed.sim.tcp.TcpSettings`) count as Linux sends, with the timestamp option: 52 B of headers
# and a 1448-byte MSS; their per-message figure comes from `tcp_ip_size` with those values.
TCP_IPV4_HEADER_BYTES = 40
TCP_MSS_BYTES = 1460


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


def remaining_length_bytes(n: int) -> int:
    """Bytes of the Remaining Length varint (7 bits a byte, at most 4 bytes)."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"remaining length {n} is outside MQTT's 0..268435455")
    if n < 128:
        return 1
    if n < 16_384:
        return 2
    if n < 2_097_152:
        return 3
    return 4


def encode_remaining_length(n: int) -> bytes:
    remaining_length_bytes(n)  # range check
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _with_fixed_header(remaining: int) -> int:
    return 1 + remaining_length_bytes(remaining) + remaining


def publish_size(topic: str, payload_len: int, qos: int, protocol: str = MQTT311, message_expiry: bool = False) -> int:
    """Encoded size of a PUBLISH: topic (2-byte length + UTF-8), packet id at QoS > 0, MQTT 5 properties."""
    variable = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0)
    if protocol == MQTT5:
        properties = 5 if message_expiry else 0  # Message Expiry Interval: 1-byte id + 4-byte integer
        variable += remaining_length_bytes(properties) + properties
    return _with_fixed_header(variable + payload_len)


def encode_publish_header(
    topic: str,
    payload_len: int,
    qos: int,
    packet_id: int | None,
    *,
    dup: bool = False,
    retain: bool = False,
    protocol: str = MQTT311,
) -> bytes:
    """The bytes of a PUBLISH up to the payload; `len(header) + payload_len == publish_size(...)`."""
    topic_bytes = topic.encode("utf-8")
    variable = struct.pack("!H", len(topic_bytes)) + topic_bytes
    if qos > 0:
        if packet_id is None or not 1 <= packet_id <= 65535:
            raise ValueError("QoS 1 and 2 PUBLISH packets need a packet id in 1..65535")
        variable += struct.pack("!H", packet_id)
    if protocol == MQTT5:
        variable += encode_remaining_length(0)  # no properties
    flags = (PacketType.PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([flags]) + encode_remaining_length(len(variable) + payload_len) + variable


def ack_size(protocol: str = MQTT311) -> int:
    """PUBACK, PUBREC, PUBREL, PUBCOMP: packet id only (MQTT 5 may omit a success reason code)."""
    return _with_fixed_header(2)


def connect_size(
    client_id: str,
    *,
    protocol: str = MQTT311,
    will_topic: str | None = None,
    will_payload_len: int = 0,
    username: str | None = None,
    password: str | None = None,
) -> int:
    variable = 2 + 4 + 1 + 1 + 2  # protocol name "MQTT", level, flags, keep-alive
    if protocol == MQTT5:
        variable += 1  # empty property length
    payload = 2 + len(client_id.encode("utf-8"))
    if will_topic is not None:
        payload += (1 if protocol == MQTT5 else 0) + 2 + len(will_topic.encode("utf-8")) + 2 + will_payload_len
    for field in (username, password):
        if field is not None:
            payload += 2 + len(field.encode("utf-8"))
    return _with_fixed_header(variable + payload)


def connack_size(protocol: str = MQTT311) -> int:
    return _with_fixed_header(2 + (1 if protocol == MQTT5 else 0))


def subscribe_size(filters: list[str], protocol: str = MQTT311) -> int:
    variable = 2 + (1 if protocol == MQTT5 else 0)
    payload = sum(2 + len(f.encode("utf-8")) + 1 for f in filters)
    return _with_fixed_header(variable + payload)


def suback_size(n_filters: int, protocol: str = MQTT311) -> int:
    return _with_fixed_header(2 + (1 if protocol == MQTT5 else 0) + n_filters)


def disconnect_size() -> int:
    return 2


def tcp_ip_size(mqtt_bytes: int, header_bytes: int = TCP_IPV4_HEADER_BYTES, mss: int = TCP_MSS_BYTES) -> int:
    """Bytes on the wire for an MQTT packet carried over TCP/IPv4: headers added per MSS-sized segment."""
    return mqtt_bytes + header_bytes * max(1, math.ceil(mqtt_bytes / mss))
