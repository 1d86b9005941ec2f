"""verl as a second training backend: this project's spawn/join rollouts and reward inside stock verl 0.9.1.

* :mod:`rl.verl.agent_loop` -- the ``threadweaver`` agent loop: the orchestrator's state machine
  (``rollout.orchestrator.agenerate``) over verl's LLM server client, one ``AgentLoopOutput`` row
  per unit (imports verl);
* :mod:`rl.verl.engine` -- the adapter from verl's ``LLMServerClient`` to
  ``rollout.engine.AsyncEngine`` (no verl import);
* :mod:`rl.verl.local_server` -- an in-process stand-in for verl's server client over this
  project's own engine (``rollout.engine.Engine``), to run the agent loop without verl's servers
  (imports verl's ``TokenOutput``);
* the reward function is ``rewards.verl_reward.compute_score`` and the data come from
  ``threadweaver export-verl`` (``cluster/cmd_export_verl.py``).

Importing this package does not import verl: only the modules that need it do, through
:func:`require`, which turns a failed import into one clear message.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: how verl gets installed next to this project's stack
INSTALL_HINT = ("verl is installed by scripts/setup.sh (pip install --no-deps -r scripts/verl-requirements.txt; "
                "see the comment there for why --no-deps)")


class VerlUnavailable(ImportError):
    """verl, or a module it needs, cannot be imported; the message names it and how to install."""


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``, raising :class:`VerlUnavailable` with :data:`INSTALL_HINT`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise VerlUnavailable(f"cannot import {module} ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
