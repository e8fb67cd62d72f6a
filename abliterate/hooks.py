"""In-memory residual-stream hooks on a loaded Hugging Face model, driven by the architecture table.

`ablate_direction` is the paper's inference-time ablation: r is removed from the embedding output, from every
sublayer output that is added to the residual (after the post-norm in sandwich-norm families) and from every decoder
layer's input. `add_direction` adds a raw vector to one layer's input (activation addition). `capture_layer_inputs`
records the residual stream at every layer input and at the final norm's input. Which modules to hook comes from
`plan_edits` run on the model's own parameter names, so hooks and weight edits always agree on the writers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from abliterate.architectures import EditPlan, TensorInfo, architecture_for, plan_edits

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


def _writer_modules(model: nn.Module, plan: EditPlan) -> list[nn.Module]:
    """Modules whose output is added to the residual: each writer's module, or its outermost post-norm."""
    names: list[str] = []
    for edit in plan.edits.values():
        source = edit.needs[-1] if edit.needs else edit.name
        module_name = source.rsplit(".", 1)[0]
        if module_name not in names:
            names.append(module_name)
    return [model.get_submodule(name) for name in names]


def _remove(hidden: Tensor, direction: Tensor) -> Tensor:
    """x <- x - (x.r) r in float32 or better, cast back to x's dtype once."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    r = direction.to(device=hidden.device, dtype=compute)  # [d_model]
    x = hidden.to(compute)  # [batch, pos, d_model]
    return (x - (x @ r).unsqueeze(-1) * r).to(hidden.dtype)


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
    """While active, r = direction/|direction| is removed from every residual writer's output and layer input."""
    r = _unit_float32(direction)
    plan = memory_plan(model)
    handles = [module.register_forward_hook(lambda _m, _a, out: _map_first(out, lambda h: _remove(h, r)))
               for module in _writer_modules(model, plan)]
    handles += [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: _replace_hidden(args, kwargs, lambda h: _remove(h, r)), with_kwargs=True)
        for layer in decoder_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
