"""How far selection's ablation hooks are from the checkpoint `apply` writes, per family, relative to the largest logit.

For each tiny model of tests/tiny_models.py (random weights, norm gains 1 +- 0.2): save it, apply a random unit
direction with `apply`, and compare the written checkpoint's logits with the original model's under
`hooks.ablate_direction` on a left-padded batch. Printed: max |edited - hooked| / max |hooked|. The sandwich-norm
families (Gemma 2/3/4, OLMo 2, GLM-4, EXAONE 4, ...) are where hooks and weight edit once disagreed.

Run:  python benchmarks/hook_exactness.py                 # the sandwich-norm families
      python benchmarks/hook_exactness.py llama gpt2 ...  # any tiny model names
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

SANDWICH = ("gemma2", "gemma3_text", "gemma3", "olmo2", "olmo3", "glm4", "exaone4", "hyperclovax", "flex_olmo",
            "gemma4_text", "gemma4_text-moe")


def gap(name: str, root: Path) -> float:
    import torch
    from tiny_models import TINY_MODELS, build_tiny, model_class, save_tiny

    from abliterate.apply import apply_direction
    from abliterate.config import load_config
    from abliterate.hooks import ablate_direction, memory_plan

    original = build_tiny(name)
    source = save_tiny(original, root / "source")
    direction = torch.randn(memory_plan(original).d_model, generator=torch.Generator().manual_seed(1))
    (root / "direction.json").write_text(json.dumps({"direction": direction.tolist()}))
    apply_direction(str(source), root / "direction.json", root / "edited", load_config())
    edited = model_class(TINY_MODELS[name]).from_pretrained(root / "edited", dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(2))  # [batch, pos]
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    with torch.no_grad():
        with ablate_direction(original, direction):
            hooked = original(**batch).logits[mask.bool()]  # [tokens, vocab]
        written = edited(**batch).logits[mask.bool()]
    return float((written - hooked).abs().max() / hooked.abs().max())


def main() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models live with the tests
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    for name in sys.argv[1:] or SANDWICH:
        with tempfile.TemporaryDirectory() as folder:
            print(f"{name:18} hooked vs written: {gap(name, Path(folder)):.2e} of the largest logit")


if __name__ == "__main__":
    main()
