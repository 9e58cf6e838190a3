"""Users, passwords and ACLs for a Mosquitto broker: `BrokerUser`, the password file (`mosquitto_passwd` or
PBKDF2 hashes written in Python) and the ACL file generated from each user's role.

The ACL model: every user has a role; a role is a list of (access, topic pattern) rules, with `{user}`
replaced by the user name (which is also the node's client id in iotbed deployments):

    camera    write frames/{user}, write status/{user}                      (reads nothing)
    gateway   read frames/#, write frames/#, write status/{user}
    edge      read frames/#, read $share/+/frames/#, read models/#, write models/#, write escalations/#,
              write status/{user}
    cloud     read escalations/#, read $share/+/escalations/#, write status/{user}
    registry  write models/#, write status/{user}
    monitor   read #, read $SYS/#
    admin     readwrite #

Where cameras encrypt their frames (`privacy:`), `privacy_rules` adds to these what the encrypted protocol
needs, and nothing where they do not: an encrypting camera writes privacy/context/{user} and reads
privacy/results/{user} (interactive: reads privacy/rounds/{user}, writes privacy/replies/#); an edge reads
privacy/context/# and writes privacy/results/# (interactive: writes privacy/rounds/#, reads
privacy/replies/{user}).

Anything not granted is denied. Mosquitto (2.0.11, measured) drops a denied PUBLISH; an MQTT 5 client gets
PUBACK reason 0x87 Not authorized at QoS 1 (at QoS 2 the PUBREC carries it, which paho 2.2 ignores; at QoS 0
and with MQTT 3.1.1 nothing tells the sender). It grants every SUBSCRIBE and checks each message against
the subscriber's read rules at delivery, with the message's topic: a shared subscription
`$share/edge/frames/#` receives frames through the `frames/#` rule (the `$share/+/frames/#` rule is there
for brokers that check the filter itself). Wrong credentials and anonymous clients get CONNACK 0x87 (MQTT 5)
or return code 5 (3.1.1).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iotbed.broker.broker_errors import BrokerError

Rule = tuple[str, str]  # (access: read | write | readwrite, topic pattern with {user})

PRIVACY_RULES: dict[tuple[str, bool], tuple[Rule, ...]] = {  # (role, interactive) -> the extra rules
    ("camera", False): (("write", "privacy/context/{user}"), ("read", "privacy/results/{user}")),
    ("edge", False): (("read", "privacy/context/#"), ("write", "privacy/results/#")),
    ("camera", True): (("read", "privacy/rounds/{user}"), ("write", "privacy/replies/#")),
    ("edge", True): (("write", "privacy/rounds/#"), ("read", "privacy/replies/{user}")),
}


def privacy_rules(role: str, interactive: bool) -> tuple[Rule, ...]:
    """What a camera or edge needs besides its role where cameras encrypt their frames."""
    extra = PRIVACY_RULES.get((role, False), ())
    return extra + (PRIVACY_RULES.get((role, True), ()) if interactive else ())


DEFAULT_ROLES: dict[str, tuple[Rule, ...]] = {
    "camera": (("write", "frames/{user}"), ("write", "status/{user}")),
    # a gateway relays frames, screens the models in service and publishes its quarantine notices
    "gateway": (
        ("read", "frames/#"),
        ("write", "frames/#"),
        ("read", "models/#"),
        ("write", "models/quarantine"),
        ("write", "status/{user}"),
    ),
    # an edge server also publishes the models it repairs (CoDefend) and the frames it escalates
    "edge": (
        ("read", "frames/#"),
        ("read", "$share/+/frames/#"),
        ("read", "models/#"),
        ("write", "models/#"),
        ("write", "escalations/#"),
        ("write", "status/{user}"),
    ),
    "cloud": (("read", "escalations/#"), ("read", "$share/+/escalations/#"), ("write", "status/{user}")),
    "registry": (("write", "models/#"), ("write", "status/{user}")),
    "monitor": (("read", "#"), ("read", "$SYS/#")),  # `#` does not match `$SYS` topics
    "admin": (("readwrite", "#"),),
}


@dataclass(frozen=True)
class BrokerUser:
    username: str
    password: str
    role: str
    extra_rules: tuple[Rule, ...] = ()


# --- passwords --------------------------------------------------------------------------------------------
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes for `$7$`


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: `$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>`."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: Iterable[BrokerUser], tool: str | None = "auto") -> None:
    """With `mosquitto_passwd -b` when available (tool="auto"), else by hashing in Python (tool=None)."""
    users = list(users)
    for user in users:
        if not user.username or ":" in user.username or "\n" in user.username:
            raise BrokerError(f"user name {user.username!r} cannot go in a Mosquitto password file")
    if tool == "auto":
        tool = shutil.which("mosquitto_passwd") or (
            "/usr/bin/mosquitto_passwd" if os.access("/usr/bin/mosquitto_passwd", os.X_OK) else None
        )
    path.write_text("")
    path.chmod(0o600)
    if tool is None:
        path.write_text("".join(f"{u.username}:{hash_password(u.password)}\n" for u in users))
        return
    for user in users:
        result = subprocess.run(
            [tool, "-b", str(path), user.username, user.password], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise BrokerError(
                f"mosquitto_passwd failed for user {user.username!r}: {(result.stderr or result.stdout).strip()}"
            )


# --- ACL ---------------------------------------------------------------------------------------------------
def acl_text(users: Iterable[BrokerUser], roles: Mapping[str, Sequence[Rule]]) -> str:
    lines = ["# generated by iotbed: one block per user, rules from the user's role", ""]
    for user in users:
        if user.role not in roles:
            raise BrokerError(f"user {user.username!r} has role {user.role!r}; known roles: {', '.join(sorted(roles))}")
        lines.append(f"# role {user.role}")
        lines.append(f"user {user.username}")
        for access, pattern in (*roles[user.role], *user.extra_rules):
            if access not in ("read", "write", "readwrite"):
                raise BrokerError(f"ACL access must be read, write or readwrite, not {access!r}")
            lines.append(f"topic {access} {pattern.replace('{user}', user.username)}")
        lines.append("")
    return "\n".join(lines)
