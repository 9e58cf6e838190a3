"""Seeded mutations of bytes and of YAML text: the generic half of every target's input generator.

Every function takes a `random.Random` and nothing else that is random, so an input is a pure function of
(seed, parser, index) and a finding can be regenerated from its index alone.
"""

from __future__ import annotations

import math
import random
import re
import struct
from collections.abc import Sequence

# Boundary values for integer header fields: zero, one, powers of two and their neighbours, all-ones.
INTERESTING_INTS = (0, 1, 2, 3, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF)
INTERESTING_INTS += (0x80000000, 0xFFFFFFFF, 0x100000000, 2**63 - 1, 2**63, 2**64 - 1)
INTERESTING_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 1e-300, 5e-324, 1e300, math.inf, -math.inf, math.nan)
INTERESTING_FLOATS += (1.0000000000000002, 0.9999999999999999)

# Values a YAML number may become: specials, negatives, overflow, precision loss, a many-digit integer.
YAML_NUMBERS = (
    ".nan",
    "nan",
    ".inf",
    "-.inf",
    "inf",
    "-1",
    "0",
    "-0",
    "1e308",
    "1e309",
    "1e-320",
    "0x7fffffffffffffff",
)
YAML_NUMBERS += ("18446744073709551616", "-9223372036854775809", "1_000_000_000_000", "0o777", "1.5", "2**64")

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_KEY_VALUE = re.compile(r"^(\s*(?:- )?[\w.-]+:)\s*(\S.*)$")


def struct_fields(fmt: str) -> list[tuple[int, str]]:
    """(offset, code) of each numeric field of a '!'-prefixed struct format, string fields left out."""
    order, codes = fmt[0], re.findall(r"\d*[a-zA-Z?]", fmt[1:])
    fields, offset = [], 0
    for code in codes:
        if not code.endswith("s"):
            fields.append((offset, code))
        offset += struct.calcsize(order + code)
    return fields


def interesting_value(rng: random.Random, code: str) -> int | float:
    """A boundary (or, a quarter of the time, uniform) value that fits the struct code."""
    if code in "fd":
        return rng.choice(INTERESTING_FLOATS) if rng.random() < 0.8 else rng.uniform(-2, 2)
    bits = 8 * struct.calcsize("!" + code)
    signed = code.islower() and code != "?"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if rng.random() < 0.25:
        return rng.randint(lo, hi)
    value = rng.choice(INTERESTING_INTS + tuple(-v for v in INTERESTING_INTS[:8]))
    value = rng.choice((value, value - 1, value + 1, hi, lo))
    return min(max(value, lo), hi)


def set_field(buf: bytearray, offset: int, code: str, value: int | float, order: str = "!") -> None:
    size = struct.calcsize(order + code)
    if offset + size <= len(buf):
        struct.pack_into(order + code, buf, offset, value)


def mutate_fields(data: bytes, fields: Sequence[tuple[int, str]], rng: random.Random, count: int = 0) -> bytes:
    """Set one to three header fields (at their offsets) to boundary values; the rest stays valid."""
    buf = bytearray(data)
    for _ in range(count or rng.choice((1, 1, 2, 3))):
        offset, code = rng.choice(fields)
        set_field(buf, offset, code, interesting_value(rng, code))
    return bytes(buf)


def mutate_bytes(data: bytes, rng: random.Random, donors: Sequence[bytes] = (), max_len: int = 1 << 20) -> bytes:
    """AFL-style havoc: a stack of 1 to 8 flips, overwrites, inserts, deletes, duplicates and splices."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        op = rng.randrange(11)
        n = len(buf)
        pos = rng.randrange(n) if n else 0
        if op == 0 and n:  # flip one bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # a random byte
            buf[pos] = rng.randrange(256)
        elif op == 2 and n:  # a boundary byte
            buf[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 3 and n:  # a boundary integer of 2, 4 or 8 bytes, either byte order
            code = rng.choice("HIQ")
            set_field(buf, pos, code, interesting_value(rng, code), rng.choice("<>"))
        elif op == 4:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 8, 64, 512)))
        elif op == 5 and n:  # delete a range
            del buf[pos : pos + rng.randint(1, max(1, n // 4))]
        elif op == 6 and n:  # duplicate a range in place
            end = pos + rng.randint(1, max(1, min(n - pos, 256)))
            buf[end:end] = buf[pos:end]
        elif op == 7 and n:  # truncate
            del buf[rng.randrange(n) :]
        elif op == 8:  # append
            buf += rng.randbytes(rng.choice((1, 8, 100, 4096)))
        elif op == 9 and donors:  # splice: our head, another seed's tail
            donor = rng.choice(donors)
            buf = buf[:pos] + donor[rng.randrange(len(donor) + 1) :]
        elif op == 10 and n > 1:  # copy one range over another
            src, length = rng.randrange(n), rng.randint(1, 32)
            buf[pos : pos + length] = buf[src : src + length]
    return bytes(buf[:max_len])


def random_bytes(rng: random.Random, prefixes: Sequence[bytes] = ()) -> bytes:
    """Noise of a random length, half the time behind a valid magic so the header checks are reached."""
    body = rng.randbytes(rng.choice((0, 1, 7, 16, 19, 27, 35, 64, 200, 1000, 5000)))
    return (rng.choice(prefixes) if prefixes and rng.random() < 0.5 else b"") + body


# --- YAML text ------------------------------------------------------------------------------------------------


def _laughs(rng: random.Random) -> list[str]:
    """A "billion laughs" block: each anchor is a list of `width` aliases of the previous one."""
    depth, width = rng.randint(2, 9), rng.randint(2, 10)
    lines = ["lol0: &lol0 [lol, lol]"]
    lines += [f"lol{d}: &lol{d} [{', '.join([f'*lol{d - 1}'] * width)}]" for d in range(1, depth + 1)]
    return lines


def _nest(value: str, rng: random.Random) -> str:
    depth = rng.choice((1, 2, 5, 20, 100, 1000, 5000))
    if rng.random() < 0.5:
        return "[" * depth + value + "]" * depth
    return "{a: " * depth + value + "}" * depth


def mutate_yaml(text: str, rng: random.Random, keys: Sequence[str]) -> str:
    """Line-level edits a user or a bad merge could make, plus the classic YAML attacks."""
    lines = text.splitlines() or [""]
    for _ in range(rng.choice((1, 1, 2, 3))):
        lines = lines or [""]  # a deletion may have emptied the file
        op = rng.randrange(10)
        i = rng.randrange(len(lines))
        kv = _KEY_VALUE.match(lines[i])
        if op == 0:  # duplicate a line or a block
            j = min(len(lines), i + rng.choice((1, 1, 3, 10)))
            lines[j:j] = lines[i:j]
        elif op == 1 and len(lines) > 1:  # delete a line or a block
            del lines[i : i + rng.choice((1, 1, 2, 5))]
        elif op == 2:  # a number becomes nan/inf/-1/huge, units kept
            matches = list(_NUMBER.finditer(lines[i])) or list(_NUMBER.finditer(text))
            if matches and _NUMBER.search(lines[i]):
                m = rng.choice(matches)
                big = "9" * rng.choice((20, 400, 5000))
                new = rng.choice((*YAML_NUMBERS, big))
                lines[i] = lines[i][: m.start()] + new + lines[i][m.end() :]
        elif op == 3 and kv:  # deepen nesting of a value
            lines[i] = f"{kv.group(1)} {_nest(kv.group(2), rng)}"
        elif op == 4:  # indent the rest of the file one level deeper
            lines[i:] = ["  " + line for line in lines[i:]]
        elif op == 5:  # billion laughs at the top, sometimes aimed at a real field
            block = _laughs(rng)
            lines[0:0] = block
            if kv and rng.random() < 0.7:
                lines[i + len(block)] = f"{kv.group(1)} *lol{len(block) - 1}"
        elif op == 6 and kv:  # an anchor on one value, aliases and merge keys elsewhere
            lines[i] = f"{kv.group(1)} &x {kv.group(2)}"
            j = rng.randrange(i, len(lines))
            kv2 = _KEY_VALUE.match(lines[j])
            if kv2 and j != i:
                lines[j] = f"{kv2.group(1)} *x"
            else:
                lines.insert(j + 1, rng.choice(("<<: *x", "extra: *x", "- *x", "*x: 1")))
        elif op == 7 and kv:  # a value of the wrong type or a YAML tag
            new = rng.choice(("[]", "{}", "~", "null", "yes", "''", "!!binary AAAA", "!!python/object:os.system x"))
            lines[i] = f"{kv.group(1)} {rng.choice((new, '!!str ' + kv.group(2), '? ' + kv.group(2)))}"
        elif op == 8:  # an unknown or duplicated key
            key = rng.choice(keys) if keys and rng.random() < 0.7 else "unknown_key"
            indent = re.match(r"\s*", lines[i]).group(0)  # type: ignore[union-attr]
            lines.insert(i, f"{indent}{key}: {rng.choice(('1', 'x', '[1, 2]', '10Mbps', '-5s'))}")
        else:  # byte-level noise on one line
            lines[i] = mutate_bytes(lines[i].encode(), rng).decode("utf-8", "replace")
    return "\n".join(lines) + "\n"


_TOKENS = (": ", "- ", "\n", "  ", "{", "}", "[", "]", ", ", "&a ", "*a", "<<: *a", "? ", "|", ">", "'", '"')
_TOKENS += ("!!str ", "!!int ", "!!map ", "---\n", "...\n", "%YAML 1.1\n", "# c\n", "\t", "1", "-1", ".nan", "10ms")


def random_yaml(rng: random.Random, keys: Sequence[str]) -> str:
    """Token soup from YAML punctuation and the scenario's own keys: mostly invalid, sometimes a mapping."""
    parts = []
    for _ in range(rng.randint(1, 80)):
        parts.append(rng.choice(keys) if keys and rng.random() < 0.35 else rng.choice(_TOKENS))
    return "".join(parts)
