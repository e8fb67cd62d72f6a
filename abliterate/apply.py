"""Apply a direction to a checkpoint on disk, shard by shard, without ever loading the model.

`apply_direction` reads every tensor's name, shape and dtype from the safetensors headers, asks the architecture
table (`architectures.plan_edits`) which tensors write into the residual stream, and writes a new checkpoint where
those tensors are orthogonalized against the direction (`weights.edit_tensor`) and every other tensor is copied
byte for byte. A tied embedding is untied: the original embedding is written as an explicit output layer, so
editing the embedding never changes the logits' weights. The output goes to a temporary directory beside `--out`
and is moved into place only when complete.

`inspect_checkpoint` builds the same plan and returns it without writing anything.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import split_state_dict_into_shards_factory
from torch import Tensor

from abliterate import __version__, progress
from abliterate.architectures import EditPlan, TensorEdit, TensorInfo, plan_edits
from abliterate.config import Config, parse_size
from abliterate.direction import Direction, load_direction, save_direction
from abliterate.edit_params import EDIT_FILE, EDIT_VECTORS, ParameterizedEdit, read_edit, write_edit
from abliterate.errors import UserError
from abliterate.files import check_out_dir
from abliterate.hub import PROVENANCE_DIR, is_hub_id, remote_tensor_infos, resolve_model
from abliterate.shards import FLOAT_DTYPES, OutputTensor, StoredTensor, read_header, read_tensor, write_shards
from abliterate.staging import fresh_staging, replace_dir
from abliterate.weights import edit_tensor

logger = logging.getLogger(__name__)

RECORD_NAME = "abliteration.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files never copied from the input: weights (written anew or refused), the old index, the old model card
# (it describes the unedited model), and git plumbing.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
_SKIP_NAMES = ("README.md", ".gitattributes", "config.json", RECORD_NAME)
# Records of how the input itself was made: kept with the provenance, not beside the weights runtimes load.
_PROVENANCE_NAMES = ("toy_refuser.json",)
# Largest slice edited at once: 4M elements keep the edited copy of a slice at 8-16 MB (the float64 maths itself
# runs in cache-sized blocks, see weights.BLOCK_ELEMENTS).
EDIT_CHUNK_ELEMENTS = 2**22


@dataclass
class Checkpoint:
    """A safetensors checkpoint as read from its headers: config, every stored tensor, and the weight files."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, StoredTensor]  # name -> where it is, in storage order
    files: list[Path]


def read_checkpoint(model_dir: Path) -> Checkpoint:
    """Read config.json and every weight file's header (no tensor data)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{model_dir / 'config.json'} is not readable JSON ({error}); fix or re-download it.")
    files = _weight_files(model_dir)
    tensors: dict[str, StoredTensor] = {}
    for path in files:
        for stored in read_header(path)[0]:
            if stored.name in tensors:
                raise UserError(f"Tensor {stored.name} is stored twice ({tensors[stored.name].path.name} and "
                                f"{path.name}); the checkpoint in {model_dir} is inconsistent.")
            tensors[stored.name] = stored
    return Checkpoint(model_dir, config, tensors, files)


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the checkpoint: those named by the index, else model.safetensors."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"{index} is not a valid index ({error}); re-download the checkpoint.") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise UserError(f"{model_dir} is missing shards named in its index: {', '.join(missing[:3])}; "
                            "re-download the checkpoint.")
        return [model_dir / name for name in names]
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise UserError(f"{model_dir} has no model.safetensors or {INDEX_NAME}; pass a Hugging Face checkpoint.")
    return files


def build_plan(model_config: dict[str, Any], infos: dict[str, TensorInfo]) -> EditPlan:
    """The architecture table's plan for a checkpoint, refusing any layer without a residual writer."""
    plan = plan_edits(model_config, infos)
    empty = [layer for layer in range(plan.n_layers) if not plan.per_layer.get(layer)]
    if empty:
        raise UserError(f"No residual-stream writer found in layer(s) {empty} ({plan.arch}); refusing to write a "
                        "partial edit.")
    unknown = [name for name in plan.edits if name not in infos]
    if unknown:
        raise RuntimeError(f"plan names tensors not in the checkpoint: {unknown[:3]}; this is a bug in abliterate")
    return plan


def _infos(checkpoint: Checkpoint) -> dict[str, TensorInfo]:
    return {name: TensorInfo(shape=t.shape, dtype=t.dtype) for name, t in checkpoint.tensors.items()}


def inspect_checkpoint(source: str, direction_path: Path | None, config: Config) -> EditPlan:
    """The edit plan of `source` (checking the direction's length if given), from headers only.

    For a Hub id the safetensors headers are read remotely, so nothing but config.json and the index is
    downloaded; offline, the local Hub cache is used.
    """
    remote = remote_tensor_infos(source, config.model.revision) if is_hub_id(source) else None
    if remote is not None:
        model_config, infos = remote[0], {name: TensorInfo(shape, dtype) for name, (shape, dtype) in remote[1].items()}
    else:
        checkpoint = read_checkpoint(resolve_model(source, config.model.revision))
        model_config, infos = checkpoint.config, _infos(checkpoint)
    plan = build_plan(model_config, infos)
    if direction_path is not None and read_edit(direction_path, plan) is None:  # an edit.json is checked by read_edit
        load_direction(direction_path, plan.d_model)
    return plan


def apply_direction(source: str, direction_path: Path, out_dir: Path, config: Config,
                    force: bool = False) -> dict[str, Any]:
    """Write `source` with the direction removed from every residual writer into `out_dir`; return the record.

    Everything that can be refused (size, paths, model, plan, direction) is checked before anything is written.
    """
    max_shard_bytes = parse_size(config.apply.max_shard_size)
    model_dir = resolve_model(source, config.model.revision)
    out_dir = check_out_dir(Path(out_dir), force, model_dir=model_dir)
    checkpoint = read_checkpoint(model_dir)
    plan = build_plan(checkpoint.config, _infos(checkpoint))
    # An optimized edit's recorded parameter set (edit.json) stands where a direction file would.
    parameterized = read_edit(direction_path, plan)
    direction = (Direction(parameterized.main_direction(), meta={"source_file": str(direction_path)})
                 if parameterized else load_direction(direction_path, plan.d_model))
    for name in plan.edits:
        _check_editable(checkpoint.tensors[name])
    shards = layout_shards(checkpoint, plan, max_shard_bytes)
    staging = fresh_staging(out_dir)
    try:
        record = _write_output(staging.path, checkpoint, plan, direction, shards, public_source(source, model_dir),
                               parameterized)
        staging.release()
        replace_dir(staging.path, out_dir)
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    logger.debug("Wrote %s: %d tensors edited, %d copied", out_dir, len(plan.edits),
                 sum(len(s) for s in shards.values()) - len(plan.edits))
    return record


def public_source(source: str, model_dir: Path) -> str:
    """How the record names the input: the Hub id as given, or only a local directory's name.

    Outputs get published; a full local path would leak the user's file layout (and often their user name).
    """
    return model_dir.name if Path(source).expanduser().is_dir() else source


def _check_editable(stored: StoredTensor) -> None:
    """Refuse early (before writing) a writer stored in a dtype abliterate cannot edit, such as FP8."""
    if stored.dtype not in FLOAT_DTYPES:
        raise UserError(f"Tensor {stored.name} is stored as {stored.dtype}; abliterate edits only float16, bfloat16 "
                        "and float32 weights. Dequantize the checkpoint first.")


def layout_shards(checkpoint: Checkpoint, plan: EditPlan, max_shard_bytes: int) -> dict[str, list[OutputTensor]]:
    """Assign output tensors to shard files in storage order, with huggingface_hub's planner (as save_pretrained).

    Every output tensor has its stored size, so the plan is made from the headers before anything is written.
    """
    outputs = {name: OutputTensor(name, stored, plan.edits.get(name)) for name, stored in checkpoint.tensors.items()}
    if plan.untie is not None:
        embedding, lm_head = plan.untie
        if lm_head in checkpoint.tensors:
            raise RuntimeError(f"plan unties into {lm_head}, which already exists; this is a bug in abliterate")
        outputs[lm_head] = OutputTensor(lm_head, checkpoint.tensors[embedding], None)  # the ORIGINAL embedding
    # No storage ids: the untied lm_head shares its source bytes with the embedding but is written twice.
    split = split_state_dict_into_shards_factory(outputs, get_storage_size=lambda tensor: tensor.source.nbytes,
                                                 filename_pattern=SINGLE_NAME.replace(".", "{suffix}.", 1),
                                                 max_shard_size=max_shard_bytes)
    return {filename: [outputs[name] for name in names] for filename, names in split.filename_to_tensors.items()}


def _write_output(tmp: Path, checkpoint: Checkpoint, plan: EditPlan, direction: Direction,
                  shards: dict[str, list[OutputTensor]], source: str,
                  parameterized: ParameterizedEdit | None = None) -> dict[str, Any]:
    """Write shards, index, config, small files, direction and record into the temporary directory."""
    needed = {name: read_tensor(checkpoint.tensors[name]) for edit in plan.edits.values() for name in edit.needs}
    provenance = {"format": "pt", "abliterate": json.dumps(
        {"version": __version__, "source": source, "direction_sha256": direction.sha256(), "record": RECORD_NAME})}

    def edit_fn(tensor: OutputTensor, place: Tensor) -> Tensor:
        edit = tensor.edit
        needs = {name: needed[name] for name in edit.needs}
        stored = read_tensor(tensor.source, place)  # read straight into its place in the output, edited there
        if parameterized is not None:
            return parameterized.edit(edit, stored, needs)
        return edit_in_chunks(edit, stored, direction.vector, needs)

    n_tensors = sum(len(group) for group in shards.values())
    bar = functools.partial(progress.track, description=f"Writing {len(shards)} shard(s)", total=n_tensors)
    write_shards({tmp / filename: group for filename, group in shards.items()}, provenance, edit_fn, bar)
    if len(shards) > 1:
        _write_index(tmp / INDEX_NAME, shards)
    copied = _copy_small_files(checkpoint.path, tmp)
    config = plan.config_updates(dict(checkpoint.config))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {key: value for key, value in direction.meta.items() if key != "source_norm"}
    save_direction(tmp / PROVENANCE_DIR, direction.vector, meta)  # with the provenance, not beside the weights
    record = _edit_record(checkpoint, plan, direction, shards, copied, source)
    if parameterized is not None:
        # The whole edit (every layer's direction, the weights), not only the single direction saved above.
        write_edit(tmp / PROVENANCE_DIR, parameterized.params, parameterized.directions, parameterized.meta)
        record["direction"]["saved_as"] += [f"{PROVENANCE_DIR}/{EDIT_FILE}", f"{PROVENANCE_DIR}/{EDIT_VECTORS}"]
        record["parameterized_edit"] = parameterized.record()
    (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def edit_in_chunks(edit: TensorEdit, tensor: Tensor, direction: Tensor, needed: dict[str, Tensor],
                   max_elements: int | None = None) -> Tensor:
    """`weights.edit_tensor` applied in place, so memory stays at one stored copy.

    A contiguous tensor is edited in place whole (the maths runs block by block in small scratch, see
    `weights.project_out`). Any other is edited slice by slice: the edit removes the direction along the tensor's
    d_model axis (`edit.axis`) independently for every index of the other axes, so slicing along any other axis
    gives the same values while the edited copy (what `edit_tensor` returns) only ever holds one slice.
    """
    if tensor.is_contiguous():
        return edit_tensor(edit, tensor, direction, needed, out=tensor)
    max_elements = max_elements or EDIT_CHUNK_ELEMENTS
    axis = edit.axis % tensor.dim()
    others = [dim for dim in range(tensor.dim()) if dim != axis]
    if tensor.numel() <= max_elements or not others:
        return edit_tensor(edit, tensor, direction, needed)
    dim = others[0]  # the outermost other axis
    step = max(1, max_elements * tensor.shape[dim] // tensor.numel())
    for start in range(0, tensor.shape[dim], step):
        part = tensor.narrow(dim, start, min(step, tensor.shape[dim] - start))
        part.copy_(edit_tensor(edit, part, direction, needed))
    return tensor


def _write_index(path: Path, shards: dict[str, list[OutputTensor]]) -> None:
    weight_map = {tensor.name: filename for filename, group in shards.items() for tensor in group}
    total_size = sum(tensor.source.nbytes for group in shards.values() for tensor in group)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_small_files(model_dir: Path, tmp: Path) -> list[str]:
    """Copy the tokenizer, generation config, chat template and other non-weight top-level files."""
    copied = []
    for path in sorted(model_dir.iterdir()):
        name = path.name
        if not path.is_file() or name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES) or \
                name.endswith(".index.json") or name.startswith("."):
            continue
        target = tmp / PROVENANCE_DIR / name if name in _PROVENANCE_NAMES else tmp / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)  # follows the Hub cache's symlinks to the real file
        copied.append(target.relative_to(tmp).as_posix())
    return copied


def _edit_record(checkpoint: Checkpoint, plan: EditPlan, direction: Direction,
                 shards: dict[str, list[OutputTensor]], copied: list[str], source: str) -> dict[str, Any]:
    """What was done, in enough detail to audit it: every edited tensor and how, counts, the direction."""
    edited = [{"name": e.name, "kind": e.kind, "role": e.role, "layer": e.layer, "needs": list(e.needs),
               "description": e.description, "dtype": checkpoint.tensors[e.name].dtype,
               "shape": list(checkpoint.tensors[e.name].shape)} for e in plan.edits.values()]
    return {
        "tool": "abliterate", "version": __version__, "source": source, "architecture": plan.arch,
        "model_type": plan.model_type, "n_layers": plan.n_layers, "d_model": plan.d_model,
        "direction": {"sha256": direction.sha256(), "norm_before_normalization": direction.meta.get("source_norm"),
                      "layer": direction.layer, "position": direction.position,
                      "file": Path(direction.meta.get("source_file", "")).name,
                      "saved_as": [f"{PROVENANCE_DIR}/direction.json", f"{PROVENANCE_DIR}/direction.safetensors"]},
        "untied": {"embedding": plan.untie[0], "lm_head": plan.untie[1]} if plan.untie else None,
        "edited_tensors": edited,
        "edits_per_layer": {str(layer): len(names) for layer, names in sorted(plan.per_layer.items())},
        "edits_by_kind": dict(Counter(e.kind for e in plan.edits.values())),
        "n_edited": len(edited),
        "n_copied": sum(len(group) for group in shards.values()) - len(edited),
        "shards": list(shards), "copied_files": copied,
    }
