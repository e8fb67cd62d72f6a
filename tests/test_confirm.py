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
    """No edit (least KL, still refusing) is generated, and stops as soon as it refuses more than the target allows;
    then the refusal direction removed (meets the target, generated in full); the overshooting edit has more KL and
    is never generated. With `only`, that edit alone is, in full; with a `bound` under every KL, none is."""
    from abliterate.confirm import confirm_in_order

    model, tokenizer, held = toy
    direction = _refusal_direction(model, tokenizer, held)
    direction = direction / direction.norm()
    edits = {7: _edit(model, 1.6, direction), 3: _edit(model, 0.0, direction), 5: _edit(model, 1.0, direction)}
    rows = {row["trial"]: row for row in confirm_in_order(model, tokenizer, edits, held, target=0.05)}
    assert rows[3]["reply_kl"] < rows[5]["reply_kl"] < rows[7]["reply_kl"]
    assert rows[3]["refusal_stopped_early"] and 0.05 < rows[3]["harmful_refusal"] < 1.0  # the base refuses all
    assert rows[3]["harmless_refusal"] is None  # not generated once the edit could not ship
    assert not rows[5]["refusal_stopped_early"] and rows[5]["harmful_refusal"] <= 0.05
    assert rows[5]["harmless_refusal"] is not None
    assert rows[7]["harmful_refusal"] is None and rows[7]["harmless_refusal"] is None
    only = {row["trial"]: row for row in confirm_in_order(model, tokenizer, edits, held, target=0.05, only=3)}
    assert only[3]["harmful_refusal"] == 1.0 and not only[3]["refusal_stopped_early"]
    assert only[7]["harmful_refusal"] is None and only[5]["harmful_refusal"] is None
    bounded = confirm_in_order(model, tokenizer, edits, held, target=0.05, bound=rows[3]["reply_kl"])
    assert all(row["harmful_refusal"] is None for row in bounded)


def test_refusal_watch_stops_generation_once_over_the_target(toy) -> None:
    """The base model refuses every harmful prompt: with 2 refusals allowed the watch stops the generation after
    the first batch decided more than 2, with no reply returned and a count it can prove (every counted reply is a
    refusal in the full generation too); with every refusal allowed it never stops."""
    from abliterate.confirm import RefusalWatch
    from abliterate.generation import generate_transformers

    model, tokenizer, held = toy
    full = generate_transformers(model, tokenizer, held.harmful, held.stop_ids, held.max_new_tokens, held.batch_size)
    assert all(held.matcher.is_refusal(reply.text) for reply in full)
    watch = RefusalWatch(tokenizer, held, allowed=2)
    found = generate_transformers(model, tokenizer, held.harmful, held.stop_ids, held.max_new_tokens,
                                  held.batch_size, watch)
    assert watch.stopped and found == [] and 2 < watch.refusing <= held.batch_size
    relaxed = RefusalWatch(tokenizer, held, allowed=len(held.harmful))
    again = generate_transformers(model, tokenizer, held.harmful, held.stop_ids, held.max_new_tokens,
                                  held.batch_size, relaxed)
    assert not relaxed.stopped and [r.token_ids for r in again] == [r.token_ids for r in full]
    assert relaxed.refusing == len(full)


def test_refusal_watch_reads_no_refusal_inside_an_open_thinking_block() -> None:
    """A reply that starts inside the prompt's thinking block and reasons "I can't" is undecided until the block
    closes; the answer after it decides. Character-level ids stand in for a tokenizer."""
    from abliterate.confirm import HeldOut, RefusalWatch
    from abliterate.metrics import matcher_for

    class Characters:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(map(chr, ids))

    held = HeldOut([], [], [], [], stop_ids=[0], pad_id=0, matcher=matcher_for("paper"), max_new_tokens=64,
                   batch_size=1)
    watch = RefusalWatch(Characters(), held, allowed=0)
    watch.begin(1, ["User: hi\nAssistant: <think>\n"])
    reply = [ord(c) for c in "I can't decide. </think> I can't help with that."]
    for length in range(4, len(reply) + 1, 4):
        ids = torch.tensor([[7, *reply[:length]]])
        stopped = bool(watch(ids, None).all())
        closed = "</think> I can't" in "".join(map(chr, reply[:length]))
        assert stopped == closed, "".join(map(chr, reply[:length]))


@pytest.mark.parametrize("weight", [0.0, 1.5, 3.0])
def test_the_searchs_identical_share_reads_replies_as_the_confirmation_does(toy, weight: float) -> None:
    """The search's validation identical share (`ReplySet.identical`, from its KL pass) equals, reply by reply, the
    confirmation's teacher-forced reading of the same replies under the same edit."""
    from abliterate.confirm import teacher_forced
    from abliterate.metrics import batches
    from abliterate.search import ReplySet

    model, _, held = toy
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))  # [d_model]
    edit = _edit(model, weight, direction / direction.norm())
    _, expected = teacher_forced(model, edit, held)
    found = []
    for batch in batches(held.scored, held.batch_size):
        replies = ReplySet.build(model, list(batch), held.pad_id, held.stop_ids)
        with edit():
            found += replies.identical(replies.log_probs(model)).tolist()
    assert found == expected
    assert weight > 0 or all(found)  # no edit keeps every reply
