"""The vLLM plugin: routed experts of every FusedMoE layer computed by the expert pool instead of in-process.

Entry point `vllm.general_plugins: expertmesh = expertmesh.router.plugin:register` (pyproject.toml); vLLM calls
`register()` in every process it starts. The plugin is inert unless asked:

    EXPERTMESH_EXPERT_MODE=remote  EXPERTMESH_DIRECTORY=host:port   routed experts go to the pool
    EXPERTMESH_EXPERT_MODE unset / "local"                           vLLM as usual (the monolithic baseline)

From Python, call `configure_remote("host:port")` (or `configure_local()`) before creating the engine; it sets the
environment (inherited by an engine-core subprocess) and applies the mode in this process.

The seam (vLLM 0.32, `vllm/model_executor/layers/fused_moe/`): a FusedMoE layer is a `MoERunner` (gate, router =
vLLM's own top-k selection, shared experts, routed-scale handling, combine) around a `RoutedExperts` whose quant
method turns (hidden, topk_weights, topk_ids) into the routed output. For unquantized models that method is
`UnquantizedFusedMoEMethod`, a `CustomOp` that vLLM lets a plugin replace out of tree (`op_registry_oot`). In
remote mode we register `RemoteExpertsMethod` under its name, so for every family (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3):
- `create_weights` registers the routed-expert parameters on the meta device (full shapes, no memory) with a
  weight_loader that discards, and they become empty tensors after loading: the router never allocates routed-expert
  weights (the checkpoint tensors are read by the loader and dropped);
- `apply` gets vLLM's topk_weights/topk_ids — gating untouched: softmax/sigmoid, grouped top-k, correction bias,
  renormalisation and `routed_scaling_factor` are applied by vLLM's router (or by the runner on the output when a
  model asks for `apply_routed_scale_to_output`) — and calls the `expertmesh::remote_experts` custom op
  (dispatch.py), which returns what vLLM's local kernel would;
- shared experts (DeepSeek-V2/V3, Qwen2-MoE) stay vLLM's modules, run on the router, and are added by the runner.
  With EXPERTMESH_SHARED_EXPERTS_OVERLAP on (default, measured in benchmarks/shared_overlap.py) they run in the
  shadow of the routed call: apply calls `remote_experts_begin` (sent), then the shared experts, then
  `remote_experts_end` (replies). vLLM's contract for that (runner/shared_experts.py, runner/moe_runner.py): a
  quant method whose `mk_can_overlap_shared_experts` is True gets order MK_INTERNAL_OVERLAPPED, so the runner does
  not run them before apply; apply runs them with `shared_experts(input, MK_INTERNAL_OVERLAPPED)`, which stores the
  output the runner reads after apply (`SharedExperts.output`). Off: vLLM runs them before apply, as usual.
Because the MoERunner itself stays, nothing has to be removed from the compilation config's
`static_forward_context` / `static_all_moe_layers` (that was needed only when swapping whole MoE modules).

Why not the modular kernel's prepare/finalize pair (vLLM's own network-EP seam): on CPU the unquantized kernel is
assembled by vLLM's oracle from the platform's experts class; a remote prepare/finalize would still need a
do-nothing experts stage and the local weights that stage expects, and prepare/finalize is selected from the
parallel config (all2all backends), not pluggable per model. Replacing the quant method is one class, works for
every family, and is where weights are created — the only place that can decline to allocate them.

Tracing: in remote mode with OTEL_EXPORTER_OTLP_ENDPOINT set, `register()` also installs step_tracing.py's two
wrappers (engine core: the new requests' trace headers onto the scheduler output; model process: a `forward pass`
span per sampled step), under which dispatch.py's per-layer spans join the requests' traces.
"""

from __future__ import annotations

import logging
import sys

from expertmesh.core import settings, telemetry

log = logging.getLogger("expertmesh.router.plugin")

ENV_EXPERT_MODE = "EXPERTMESH_EXPERT_MODE"
MODES = ("local", "remote")
_OOT_NAME = "UnquantizedFusedMoEMethod"


def expert_mode() -> str:
    return settings.expert_mode()  # validated by the registry: one of MODES


def register() -> None:
    """vLLM general-plugin entry point: apply the mode from the environment (no-op in local mode). In remote mode,
    split steps into ping-pong micro-batches when asked (micro_batches.py), and with tracing on carry requests'
    trace context to the forward pass (step_tracing.py)."""
    apply_mode()
    if expert_mode() == "remote" and telemetry.tracing_enabled():
        from expertmesh.router import step_tracing

        step_tracing.install()


def configure_remote(
    directory: str | None = None, *, deadline_s: float | None = None, counters_file: str | None = None
) -> None:
    """Route experts to the pool registered at `directory` (host:port; default EXPERTMESH_DIRECTORY).

    Call before creating the vLLM engine. Sets EXPERTMESH_EXPERT_MODE/EXPERTMESH_DIRECTORY (and pins the
    routed-token counters file, so a multiprocess engine core writes where this process reads).
    """
    from expertmesh.router.counters import ENV_COUNTERS_FILE, default_counters_path

    settings.export(ENV_EXPERT_MODE, "remote")
    settings.export("EXPERTMESH_DIRECTORY", directory or settings.directory_address())
    if deadline_s is not None:
        settings.export("EXPERTMESH_DISPATCH_DEADLINE_S", deadline_s)
    settings.export(ENV_COUNTERS_FILE, counters_file or default_counters_path())
    apply_mode()


def configure_local() -> None:
    """vLLM computes experts in-process as usual (monolithic baseline)."""
    settings.export(ENV_EXPERT_MODE, "local")
    apply_mode()


def counters_file() -> str:
    """Where this router's routed-token counters live (see counters.RoutedTokenCounters.open)."""
    from expertmesh.router.counters import default_counters_path

    return default_counters_path()


def apply_mode() -> None:
    """Install or remove the remote quant method in vLLM's out-of-tree op registry, per EXPERTMESH_EXPERT_MODE (and,
    in remote mode, the micro-batch wrappers of vLLM's CPU runner; they only split steps in remote mode)."""
    mode = expert_mode()
    if mode == "local" and "vllm" not in sys.modules:
        return  # nothing installed, nothing to import
    from vllm.model_executor.custom_op import op_registry_oot

    if mode == "remote":
        op_registry_oot[_OOT_NAME] = remote_method_class()
        from expertmesh.router import micro_batches

        micro_batches.install()  # EXPERTMESH_MICRO_BATCHES >= 2: ping-pong micro-batches in the CPU runner
    elif getattr(op_registry_oot.get(_OOT_NAME), "_expertmesh", False):
        del op_registry_oot[_OOT_NAME]


_method_cls = None


def remote_method_class():
    """RemoteExpertsMethod, defined on first use (it subclasses vLLM classes; importing them is not free)."""
    global _method_cls
    if _method_cls is not None:
        return _method_cls

    import torch
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.model_executor.utils import set_weight_attrs

    from expertmesh.router import dispatch

    def _discard_weight(*args, **kwargs) -> bool:
        """weight_loader of the zero-size routed-expert parameters: the pool holds those weights."""
        return True

    def _stored_output(shared_experts):
        """The output `SharedExperts.forward` just stored for the runner to read after apply (vLLM 0.32 keeps it in
        `_output`, one slot per DBO micro-batch), or None: vLLM turned the overlap off for this layer (EPLB,
        sequence parallelism) and the runner ran them before apply, so the call above was a no-op."""
        return shared_experts._output[shared_experts._output_idx]

    class RemoteExpertsMethod(UnquantizedFusedMoEMethod):
        """Routed experts of one FusedMoE layer computed by the expert pool (see module docstring)."""

        _expertmesh = True

        def __init__(self, moe):
            super().__init__(moe)
            # Read once per layer, when vLLM builds the model (a compiled graph could not follow a later change).
            # With micro-batches the shared experts always run inside apply, after the hand-off: vLLM keeps one
            # shared-expert output slot per layer, stored before apply and read after it in its own order, and the
            # next micro-batch runs in between (micro_batches.py).
            self.overlap_shared_experts = settings.shared_experts_overlap() or settings.micro_batches() > 1

        @property
        def mk_can_overlap_shared_experts(self) -> bool:
            # vLLM's contract (runner/shared_experts.py): True = this method runs the layer's shared experts itself,
            # inside apply, through `shared_experts(input, MK_INTERNAL_OVERLAPPED)`; the runner then does not run
            # them before apply, and reads their output after it.
            return self.overlap_shared_experts

        @property
        def is_monolithic(self) -> bool:
            return False  # vLLM's router selects experts; we get topk_weights/topk_ids

        @property
        def supports_eplb(self) -> bool:
            return False

        def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
            return hidden_size, intermediate_size_per_partition  # no local kernel to pad for

        def create_weights(
            self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
        ):
            # The routed-expert parameters at their full shapes on the meta device: no memory, yet every family's
            # loader finds what it expects (GPT-OSS copies checkpoint tensors straight into `param.data`; on a
            # zero-size CPU tensor that copy fails, on meta it is a no-op). Replaced by empty tensors on the
            # model's device once loading is done (process_weights_after_loading).
            I, H = intermediate_size_per_partition, hidden_size
            up = 2 * I if self.moe.is_act_and_mul else I
            shapes = {"w13_weight": (num_experts, up, H), "w2_weight": (num_experts, H, I)}
            if self.moe.has_bias:
                shapes |= {"w13_bias": (num_experts, up), "w2_bias": (num_experts, H)}
            self.device = torch.empty(0).device  # the model's device (vLLM builds the model under it)
            for name, shape in shapes.items():
                param = torch.nn.Parameter(torch.empty(shape, dtype=params_dtype, device="meta"), requires_grad=False)
                layer.register_parameter(name, param)
                set_weight_attrs(param, {"weight_loader": _discard_weight})
                param.weight_loader_numel = 0
            self.layer_index = extract_layer_index(layer.layer_name)
            self.num_experts = int(layer.global_num_experts)
            vllm_config = get_current_vllm_config()
            dispatcher = dispatch.get_dispatcher()
            dispatcher.register_layer(id(vllm_config), self.layer_index, self.num_experts)
            dispatcher.set_checkpoint(vllm_config.model_config.model)  # for experts no replica holds

        def process_weights_after_loading(self, layer) -> None:
            # Nothing was loaded; nothing on the meta device may reach the forward pass or torch.compile.
            for name, param in list(layer.named_parameters(recurse=False)):
                if param.device.type == "meta":
                    empty = torch.empty(0, dtype=param.dtype, device=self.device)
                    layer.register_parameter(name, torch.nn.Parameter(empty, requires_grad=False))

        def get_fused_moe_quant_config(self, layer):
            return FusedMoEQuantConfig.make()

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            if layer.apply_router_weight_on_input:
                # (top-1 models) weight the input, not the output, as vLLM's prepare step does
                x = x * topk_weights.to(x.dtype)
                topk_weights = torch.ones_like(topk_weights)
            if shared_experts is None or not self.overlap_shared_experts:
                return torch.ops.expertmesh.remote_experts(x, topk_weights, topk_ids, self.layer_index)
            # The shared experts in the shadow of the routed call: send, compute them, then wait for the replies
            # (dispatch.py: why begin takes their input and end their output).
            handle = torch.ops.expertmesh.remote_experts_begin(
                x, topk_weights, topk_ids, self.layer_index, shared_experts_input
            )
            shared_experts(shared_experts_input, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)
            shared_out = _stored_output(shared_experts)
            return torch.ops.expertmesh.remote_experts_end(handle, x, x if shared_out is None else shared_out)

    _method_cls = RemoteExpertsMethod
    return _method_cls
