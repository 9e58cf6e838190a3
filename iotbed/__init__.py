"""iotbed: a testbed for the security of deep-learning inference in IoT deployments.

From Python: `scenario = iotbed.load_scenario("scenarios/quickstart.yaml")`, then
`result = iotbed.run(scenario)`; `result.summary` is a dict and `result.trace` a pandas DataFrame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_scenario", "parse_scenario", "run", "RunResult", "Scenario"]

if TYPE_CHECKING:
    from iotbed.runner import RunResult, run
    from iotbed.scenario import Scenario, load_scenario, parse_scenario


def __getattr__(name: str) -> Any:
    # Imported on first use, so `iotbed --help` and `iotbed validate` do not pay for importing torch.
    if name in ("run", "RunResult"):
        from iotbed import runner

        return getattr(runner, name)
    if name in ("load_scenario", "parse_scenario", "Scenario"):
        from iotbed import scenario

        return getattr(scenario, name)
    raise AttributeError(f"module 'iotbed' has no attribute {name!r}")
