"""Static description of one op call, shared by the ops layer and the backends.

Hashable, so it can be a ``custom_vjp`` non-differentiable argument and part of
jit cache keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class OpSpec:
    backend: str  # "reference" | "cuda"
    group_key: str  # the group's key (Group.key): what a compiled program binds to
    axis_name: Any
    num_ranks: int
    num_experts: int
    layout: str = "expert_major"
    capacity: int = 0
    fp8: bool = False
    round_scale: bool = False
    dequantize: bool = False
    max_tokens_per_rank: int = 0
    sync_errors: bool = False
    spans_nodes: bool = False  # internode group: extra columns do not travel with combine rows
    fault_inject_rank: int = -1
    host_checks: bool = True  # Config.host_checks

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks
