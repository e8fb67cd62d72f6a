"""The confirmation reads identical replies from one teacher-forced pass: it must agree with generating them.

On the toy refuser, edits that change no reply, some replies, and most of them (a random direction removed at
weights 0 to 3), and one that makes harmless prompts refuse (the refusal direction amplified, weight -3) are
confirmed, and the same edits generate every harmless reply: the identical share and the harmless refusal must be
exactly what generation gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abliterate.edit_params import EditParams, Kernel, hooked_edit


@pytest.fixture(scope="module")
def toy(toy_refuser_dir: Path, one_thread: None):
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.confirm import held_out
    from abliterate.demo import demo_config
    from abliterate.generation import pad_token_id
    from abliterate.metrics import matcher_for
    from abliterate.model import load_model
    from abliterate.prompts import load_prompts

    config = demo_config()
    model, tokenizer = load_model(str(toy_refuser_dir), config.model)
    texts = {side: format_instructions(tokenizer, [p.text for p in load_prompts(f"builtin:toy_{side}_eval")][:40],
                                       config.model) for side in ("harmful", "harmless")}
    stop = list(stop_token_ids(tokenizer, model.generation_config))
    held = held_out(model, tokenizer, texts["harmful"], texts["harmless"], stop, pad_token_id(tokenizer, stop),
                    matcher_for("paper"), 24, 16)
    return model, tokenizer, held


def _edit(model, weight: float, direction: torch.Tensor):
    n_layers = model.config.num_hidden_layers
    params = EditParams(position=-1, direction_index=0.0, mixer=Kernel(weight, 0.0, weight, 1e9),
                        mlp=Kernel(weight, 0.0, weight, 1e9), embed_weight=weight)
    return lambda: hooked_edit(model, params, direction.expand(n_layers + 1, -1))


def _refusal_direction(model, tokenizer, held) -> torch.Tensor:
    """Harmful minus harmless mean residual at the last prompt token, at the middle layer's input."""
    from abliterate.hooks import capture_layer_inputs

    layer = model.config.num_hidden_layers // 2
    means = []
    for texts in (held.harmful, held.harmless):
        rows = []
        with capture_layer_inputs(model) as captured, torch.inference_mode():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt", add_special_tokens=False))
                rows.append(captured[layer][0, -1].float())  # [d_model]
        means.append(torch.stack(rows).mean(0))
    return means[0] - means[1]


@pytest.mark.parametrize("weight", [0.0, 0.4, 1.5, 3.0, -3.0])
def test_identical_share_and_harmless_refusal_equal_generation(toy, weight: float) -> None:
    from abliterate.confirm import confirm
    from abliterate.generation import generate_transformers

    model, tokenizer, held = toy
    if weight < 0:
        direction = _refusal_direction(model, tokenizer, held)  # [d_model]
    else:
        direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # [d_model]
    direction = direction / direction.norm()
    edit = _edit(model, weight, direction)
    figures = confirm(model, tokenizer, edit, held)
    with edit():
        generated = generate_transformers(model, tokenizer, held.harmless, held.stop_ids, held.max_new_tokens,
                                          held.batch_size)
    identical = [a.token_ids == b.token_ids for a, b in zip(generated, held.base_harmless)]
    refusing = [held.matcher.is_refusal(reply.text) for reply in generated]
    assert figures["identical_share"] == sum(identical) / len(identical)
    assert figures["harmless_refusal"] == sum(refusing) / len(refusing)
    if weight == 0.0:
        assert figures["identical_share"] == 1.0 and figures["reply_kl"] == 0.0
    if weight == 3.0:
        assert 0 < sum(identical) < len(identical) / 2  # both kinds of reply are compared
    if weight < 0:
        assert 0 < sum(refusing) < len(refusing)


def test_refusal_is_generated_in_order_of_kl_until_an_edit_meets_the_target(toy) -> None:
    """No edit (least KL, still refusing) is generated, then the refusal direction removed (meets the target); the
    overshooting edit has more KL and is never generated. With `only`, that edit alone is."""
    from abliterate.confirm import confirm_in_order

    model, tokenizer, held = toy
    direction = _refusal_direction(model, tokenizer, held)
    direction = direction / direction.norm()
    edits = {7: _edit(model, 1.6, direction), 3: _edit(model, 0.0, direction), 5: _edit(model, 1.0, direction)}
    rows = {row["trial"]: row for row in confirm_in_order(model, tokenizer, edits, held, target=0.05)}
    assert rows[3]["reply_kl"] < rows[5]["reply_kl"] < rows[7]["reply_kl"]
    assert rows[3]["harmful_refusal"] == 1.0 and rows[5]["harmful_refusal"] <= 0.05
    assert rows[7]["harmful_refusal"] is None and rows[7]["harmless_refusal"] is None
    only = {row["trial"]: row for row in confirm_in_order(model, tokenizer, edits, held, target=0.05, only=7)}
    assert only[7]["harmful_refusal"] is not None
    assert only[3]["harmful_refusal"] is None and only[5]["harmful_refusal"] is None
