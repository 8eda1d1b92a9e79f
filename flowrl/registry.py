"""The agent registry: ``algo`` names -> (stage, agent class, config class).

The CLI and the config loader reach agents only through here, by import path, so flowrl's core
never imports an agent. A new algorithm is one file in ``agents/`` plus one :func:`register_agent`
line below (or, from another package, a call at import time of a ``flowrl.plugins`` entry point).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from flowrl.errors import FlowrlError

STAGES = ("pretrain", "finetune")
DEFAULT_ALGO = {"pretrain": "bc", "finetune": "reinflow"}


@dataclass(frozen=True)
class AgentInfo:
    name: str
    stage: str
    """``pretrain`` (from demonstrations) or ``finetune`` (from a pretrained checkpoint, ``--init``)."""
    agent: Any
    """The agent class, or its import path ``"module:Class"`` (imported when first needed)."""
    config: Any
    """The dataclass of its ``train`` section, or its import path."""
    description: str = ""

    def agent_class(self) -> Any:
        return _resolve(self.agent)

    def config_class(self) -> Any:
        return _resolve(self.config)


def _resolve(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_AGENTS: dict[str, AgentInfo] = {}


def register_agent(name: str, stage: str, agent: Any, config: Any, description: str = "") -> AgentInfo:
    if stage not in STAGES:
        raise FlowrlError(f"agent {name}: stage must be one of {', '.join(STAGES)}, got '{stage}'")
    info = AgentInfo(name, stage, agent, config, description)
    _AGENTS[name] = info
    return info


def agents(stage: str | None = None) -> dict[str, AgentInfo]:
    from flowrl.plugins import load_plugins

    load_plugins()
    return {k: v for k, v in _AGENTS.items() if stage is None or v.stage == stage}


def agent_info(stage: str, algo: str) -> AgentInfo:
    known = agents(stage)
    if algo not in known:
        raise FlowrlError(f"config: algo: unknown {stage} algorithm '{algo}'; known: {', '.join(sorted(known))}")
    return known[algo]


TOOLS = {"collect": "flowrl.agents.collect:collect", "expert": "flowrl.agents.expert:train_expert",
         "time-grid": "flowrl.agents.distill:write_time_grids"}
"""The other commands' entry points in ``flowrl.agents`` (demonstration collection, expert training, the optimal
Euler grids of ``flowrl distill --grid``)."""


def tool(name: str) -> Any:
    """The function behind ``flowrl collect`` / ``flowrl expert`` / ``flowrl distill --grid``, imported when first
    used."""
    return _resolve(TOOLS[name])


register_agent("bc", "pretrain", "flowrl.agents.bc:BehaviorCloning", "flowrl.agents.bc:BCConfig",
               "behaviour cloning (flow matching; shortcut self-consistency for shortcut heads, interval splitting "
               "for meanflow heads)")
register_agent("mle", "finetune", "flowrl.agents.mle:MLEFineTuning", "flowrl.agents.mle:MLEConfig",
               "MLE of the policy's own K-step reconstructions of demonstrations (ft, or resft: a contracting residual)")
register_agent("reinflow", "finetune", "flowrl.agents.reinflow:ReinFlow", "flowrl.agents.reinflow:ReinFlowConfig",
               "ReinFlow: PPO over the flow's noise-injected Euler chain")
register_agent("dsrl", "finetune", "flowrl.agents.dsrl:DSRL", "flowrl.agents.dsrl:DSRLConfig",
               "DSRL: PPO over the initial noise of the frozen flow (a steering head; starts exactly at the pretrained policy)")
register_agent("distill", "finetune", "flowrl.agents.distill:Distillation", "flowrl.agents.distill:DistillConfig",
               "distillation of a policy's sampler into a few-step student from prior noise (no actions read)")
