"""In-memory residual-stream hooks on a loaded Hugging Face model, driven by the architecture table.

`ablate_direction` is the paper's inference-time ablation realised exactly as the weight edit that `apply` writes:
every residual writer's own output y (the embedding, each attention and MLP output projection, fused experts) loses
its component along u, y <- y - (y.u) u, where u = r for a writer added straight to the residual and
u = normalize(g * r) for one behind a post-norm with gain g (sandwich norms, see `abliterate.weights`). That is the
same linear map as W <- W - u u^T W, so the hooked model and the edited checkpoint are the same model to float
tolerance in every family; removing r from the post-norm's output instead would leave the residual orthogonal to r
too, but through a different model than the one the user gets. With every writer clean the residual stream at each
layer input is orthogonal to r already, so no layer-input hook is needed (the paper's code adds one; here it would
be a no-op). `project_writers` is the general form (per-writer direction and strength) that parameterized edits use.

`add_direction` adds a raw vector to one layer's input (activation addition). `capture_layer_inputs` records the
residual stream at every layer input and at the final norm's input. Which modules to hook comes from `plan_edits`
run on the model's own parameter names, so hooks and weight edits always agree on the writers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from abliterate.architectures import EditPlan, TensorEdit, TensorInfo, architecture_for, plan_edits
from abliterate.weights import norm_gain, post_norm_direction

# Selection hooks the same model once per candidate: plan it once (the table and the parameter names do not change).
_PLANS: weakref.WeakKeyDictionary[nn.Module, EditPlan] = weakref.WeakKeyDictionary()


def memory_plan(model: nn.Module) -> EditPlan:
    """The edit plan of a loaded model, from its config and in-memory parameter names."""
    if model not in _PLANS:
        tensors = {name: TensorInfo(tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items()}
        _PLANS[model] = plan_edits(model.config.to_dict(), tensors)
    return _PLANS[model]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder's layers, in order, for any supported family (text models and multimodal wrappers)."""
    plan = memory_plan(model)
    container = model.get_submodule(plan.layers_prefix.rstrip("."))
    return list(container)[: plan.n_layers]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (its input is the residual stream's end)."""
    plan = memory_plan(model)
    arch = architecture_for(model.config.to_dict())
    return model.get_submodule(plan.prefix + arch.final_norm)


@dataclass(frozen=True)
class Writer:
    """A module whose output is added to the residual (perhaps through post-norms), with its planned edit.

    `edit` stands for every tensor of the module the plan edits (a weight and its bias share role, layer and norms).
    """

    module: str
    edit: TensorEdit


def writers(model: nn.Module) -> list[Writer]:
    """Every residual writer module of a loaded model, in plan order: the module that owns each edited tensor."""
    found: dict[str, Writer] = {}
    for edit in memory_plan(model).edits.values():
        module = edit.name.rsplit(".", 1)[0]
        if module in found and found[module].edit.needs != edit.needs:
            raise RuntimeError(f"tensors of {module} sit behind different post-norms; this is a bug in the table")
        found.setdefault(module, Writer(module, edit))
    return list(found.values())


def writer_direction(model: nn.Module, writer: Writer, direction: Tensor,
                     params: dict[str, Tensor] | None = None) -> Tensor:
    """The float64 direction the weight edit removes from this writer's output: r, or normalize(g * r) behind norms.

    Zero when every post-norm gain on r's support is zero (the norm's output has no r component to remove).
    `params` is the model's named parameters, when the caller already has them.
    """
    params = params if params is not None else dict(model.named_parameters())
    # The gains are d_model vectors: computed on the CPU, whatever device (or devices) the model is on.
    gains = [norm_gain(params[name].detach().cpu(), writer.edit.gain) for name in writer.edit.needs]
    return post_norm_direction(direction.detach().cpu().to(torch.float64), gains)  # [d_model]


@contextmanager
def project_writers(model: nn.Module, projections: list[tuple[Writer, Tensor, float]]) -> Iterator[None]:
    """While active, each writer's output y becomes y - weight (y.u) u for its (writer, u, weight); u is unit norm.

    This is the linear map (I - weight u u^T) applied to everything the writer adds, i.e. the weight edit
    W <- W - weight u u^T W (and the same on its bias), so hooked and edited models agree.
    """
    handles = []
    for writer, u, weight in projections:
        if weight == 0 or not bool(u.any()):
            continue
        unit_u = u.detach().to(torch.float32)

        def hook(_m: nn.Module, _a: Any, out: Any, unit_u: Tensor = unit_u, weight: float = weight) -> Any:
            return _map_first(out, lambda h: _remove(h, unit_u, weight))

        handles.append(model.get_submodule(writer.module).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _remove(hidden: Tensor, direction: Tensor, weight: float = 1.0) -> Tensor:
    """x <- x - weight (x.r) r in float32 or better, cast back to x's dtype once."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    r = direction.to(device=hidden.device, dtype=compute)  # [d_model]
    x = hidden.to(compute)  # [batch, pos, d_model]
    return (x - weight * (x @ r).unsqueeze(-1) * r).to(hidden.dtype)


def _map_first(output: Any, function: Any) -> Any:
    """Apply `function` to a module output, or to the first element of a tuple output (attention returns tuples)."""
    if isinstance(output, tuple):
        return (function(output[0]), *output[1:])
    return function(output)


def _unit_float32(direction: Tensor) -> Tensor:
    direction = direction.detach().flatten().to(torch.float64)  # [d_model]
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        # A zero or NaN direction would silently turn every activation into NaN; callers skip such candidates.
        raise ValueError("cannot ablate a zero or non-finite direction")
    return (direction / norm).to(torch.float32)


def _replace_hidden(args: tuple, kwargs: dict, function: Any) -> tuple[tuple, dict]:
    """Apply `function` to a decoder layer's hidden-states input, passed positionally or by keyword."""
    if args:
        return (function(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": function(kwargs["hidden_states"])}


@contextmanager
def ablate_direction(model: nn.Module, direction: Tensor) -> Iterator[None]:
    """While active, the model is the one `apply` writes for `direction`: each writer loses r (or g * r, normalized)."""
    r = _unit_float32(direction)
    params = dict(model.named_parameters())
    with project_writers(model, [(w, writer_direction(model, w, r, params), 1.0) for w in writers(model)]):
        yield


@contextmanager
def add_direction(model: nn.Module, vector: Tensor, layer: int) -> Iterator[None]:
    """While active, the raw `vector` (not normalized) is added to the input of decoder layer `layer`."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range for a model with {len(layers)} layers")
    added = vector.detach().flatten()  # [d_model]

    def add(hidden: Tensor) -> Tensor:
        compute = torch.promote_types(hidden.dtype, torch.float32)
        return (hidden.to(compute) + added.to(device=hidden.device, dtype=compute)).to(hidden.dtype)

    handle = layers[layer].register_forward_pre_hook(
        lambda _m, args, kwargs: _replace_hidden(args, kwargs, add), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_layer_inputs(model: nn.Module) -> Iterator[dict[int, Tensor]]:
    """Record the residual stream: key i < n_layers is layer i's input, key n_layers the final norm's input.

    Each forward pass overwrites the entries; tensors are detached and keep the model's dtype and device.
    """
    captured: dict[int, Tensor] = {}
    modules = [*decoder_layers(model), final_norm(model)]

    def recorder(index: int) -> Any:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return record

    handles = [module.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
