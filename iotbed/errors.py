"""Errors a user can act on.

Every user mistake (a bad scenario file, a missing dataset file, a wrong flag) raises a subclass of
`IotbedError`; the CLI prints its message and exits with `exit_code`, never a traceback.
"""

from __future__ import annotations


class IotbedError(Exception):
    """A problem the user can fix. The message says where it is and how to fix it."""

    exit_code: int = 1


class ScenarioError(IotbedError):
    """A scenario file that does not load or validate."""

    exit_code = 2


class DatasetError(IotbedError):
    """A dataset that is missing, corrupt or not in the expected format."""

    exit_code = 2


class ModelError(IotbedError):
    """A model that cannot be built, trained or loaded as asked."""

    exit_code = 2


class UsageError(IotbedError):
    """Options that cannot work together or have no meaning (a worker count of 0, --netns with a remote broker)."""

    exit_code = 2
