"""The placement plan: which (layer, expert) keys each expert group holds, and its replica bounds.

One schema, one loader, used by the local expert pool (`expertmesh experts up --plan`), rendered into the
KubeRay RayService by the Helm chart, and produced by the planner. YAML on disk:

    version: 1
    model: /models/mixtral          # optional; the pool can be given the model separately
    autoscaling:                    # defaults for every group (a group may override any field)
      target_tokens_per_second: 2000   # routed tokens/s one replica should carry
      upscale_delay_s: 3
      downscale_delay_s: 15
    groups:
      - name: l0-e0-7
        keys: {0: [0, 1, 2, 3, 4, 5, 6, 7]}   # layer -> experts
        min_replicas: 1
        max_replicas: 4
        initial_replicas: 1
        zone: a                     # optional: prefer nodes labelled expertmesh.io/zone=a (soft)
        resources: {gpu-node: 1}    # optional: custom Ray resources each replica needs (a hard pin)

Default plan (`default_plan`): whole MoE layers packed into as few groups as fit `max_group_bytes` (2 GiB) of
expert weights each; a layer bigger than the budget is split into expert chunks that fit. Why: a decode step
visits the MoE layers one after another and a group answers one RPC per layer per step, so every plan costs the
same number of round trips; fewer groups mean fewer replica processes (each holds a Python runtime and its own
threads — on a laptop they compete for the same cores) and replicas that are called every layer rather than
once a step, so they stay warm (measured in docs/benchmarks.md). The budget bounds a replica's memory for large
models (Mixtral-8x7B: one layer per group; DeepSeek-V3: 256 experts x 44 MB per layer, chunked). Hot experts
are split into their own groups with more replicas by the controller.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from expertmesh.core.checkpoint import MoEInfo


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_tokens_per_second: float = Field(2000.0, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(15.0, ge=0)


class ExpertGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=50)
    keys: dict[int, list[int]]
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    autoscaling: Autoscaling | None = None
    # Placement over Ray nodes (rendered by control/serve_config.py and the Helm chart alike):
    # zone: the replicas prefer nodes whose label expertmesh.io/zone has this value, and go elsewhere rather than
    # nowhere when none is alive (a dead node's replicas come back on the others). Unset: the pool picks zones so
    # that an expert's holders prefer different nodes (serve_config.assign_zones).
    zone: str | None = Field(None, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", max_length=63)
    # resources: custom Ray resources each replica needs (`ray start --resources '{"big-mem": 4}'`): a hard pin,
    # a replica waits for a node that has them.
    resources: dict[str, float] | None = None

    @field_validator("keys")
    @classmethod
    def _keys_sorted(cls, keys: dict[int, list[int]]) -> dict[int, list[int]]:
        if not keys or not any(keys.values()):
            raise ValueError("a group must hold at least one (layer, expert) key")
        for layer, experts in keys.items():
            if layer < 0 or any(e < 0 for e in experts):
                raise ValueError(f"negative layer or expert id in layer {layer}: {experts}")
            if len(set(experts)) != len(experts):
                raise ValueError(f"duplicate expert ids in layer {layer}: {experts}")
        return {int(layer): sorted(int(e) for e in experts) for layer, experts in sorted(keys.items())}

    @model_validator(mode="after")
    def _bounds(self) -> ExpertGroup:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"group {self.name}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"group {self.name}: initial_replicas outside [min_replicas, max_replicas]")
        return self

    @property
    def start_replicas(self) -> int:
        return self.initial_replicas if self.initial_replicas is not None else max(1, self.min_replicas)

    def key_list(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, experts in self.keys.items() for e in experts]


class PlacementPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    model: str | None = None
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    groups: list[ExpertGroup]

    @model_validator(mode="after")
    def _unique(self) -> PlacementPlan:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique: {names}")
        return self

    def autoscaling_for(self, group: ExpertGroup) -> Autoscaling:
        return group.autoscaling or self.autoscaling

    def holders(self) -> dict[tuple[int, int], list[str]]:
        """(layer, expert) -> names of the groups holding it."""
        out: dict[tuple[int, int], list[str]] = {}
        for g in self.groups:
            for key in g.key_list():
                out.setdefault(key, []).append(g.name)
        return out

    def check_covers(self, info: MoEInfo) -> None:
        """Raise ValueError unless every routed expert of the model is held by some group (and nothing else)."""
        held = self.holders()
        wanted = set(info.keys())
        missing = sorted(wanted - set(held))
        extra = sorted(set(held) - wanted)
        if missing:
            raise ValueError(f"plan does not place {len(missing)} expert(s), e.g. (layer, expert) {missing[:5]}")
        if extra:
            raise ValueError(f"plan places keys the model does not have, e.g. {extra[:5]}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def load_plan(path: str | Path) -> PlacementPlan:
    """Read and validate a plan YAML file (errors name the file and the offending field)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a plan is a mapping with a 'groups' list")
    return PlacementPlan.model_validate(data)


DEFAULT_GROUP_BYTES = 2 << 30  # expert weights one replica of the default plan holds at most


def default_plan(
    info: MoEInfo,
    max_group_bytes: int = DEFAULT_GROUP_BYTES,
    max_replicas: int = 2,
    layers_per_group: int | None = None,
) -> PlacementPlan:
    """The default placement: whole MoE layers packed into groups of at most `max_group_bytes` of expert weights
    (a layer bigger than that is split into expert chunks that fit). `layers_per_group` caps how many layers one
    group takes (1 = one group per layer)."""
    per_layer = info.num_experts * info.expert_bytes
    if per_layer > max_group_bytes:  # big layers: chunks of experts, one layer at a time
        per_group = max(1, max_group_bytes // max(1, info.expert_bytes))
        groups = []
        for layer in info.moe_layers:
            for start in range(0, info.num_experts, per_group):
                experts = list(range(start, min(info.num_experts, start + per_group)))
                groups.append(
                    ExpertGroup(
                        name=f"l{layer}-e{experts[0]}-{experts[-1]}",
                        keys={layer: experts},
                        min_replicas=1,
                        max_replicas=max_replicas,
                    )
                )
        return PlacementPlan(model=str(info.path), groups=groups)
    take = max(1, max_group_bytes // per_layer)
    if layers_per_group is not None:
        take = max(1, min(take, layers_per_group))
    groups = []
    all_experts = list(range(info.num_experts))
    for i in range(0, len(info.moe_layers), take):
        layers = info.moe_layers[i : i + take]
        name = f"l{layers[0]}" if len(layers) == 1 else f"l{layers[0]}-{layers[-1]}"
        groups.append(
            ExpertGroup(
                name=name, keys={layer: all_experts for layer in layers}, min_replicas=1, max_replicas=max_replicas
            )
        )
    return PlacementPlan(model=str(info.path), groups=groups)
