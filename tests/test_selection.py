"""The maths and the choice of `measure`, on fixed numbers and a tiny random Llama (no toy model needed).

Refusal score and KL on hand-made logits, difference of means, the paper's filters, the nothing-passes message,
activations checked against the model's own hidden states, and the pruned search choosing exactly what the full
search chooses.
"""

import logging
import math

import pytest
import torch

from abliterate.activations import (
    Batch,
    difference_of_means,
    encode,
    in_text_order,
    kl_divergence,
    mean_activations,
    refusal_score,
)
from abliterate.config import MeasureConfig
from abliterate.errors import UserError
from abliterate.selection import (
    INDUCE_NOT_SCORED,
    CandidateScore,
    NoDirectionError,
    build_validation_set,
    check_kept,
    choose,
    failed_filters,
    score_candidates,
)


def _logits_with_refusal_mass(p_refusal: float, vocab: int = 5) -> torch.Tensor:
    """Logits whose softmax puts `p_refusal` on token 0 and spreads the rest evenly."""
    rest = (1 - p_refusal) / (vocab - 1)
    return torch.log(torch.tensor([[p_refusal] + [rest] * (vocab - 1)], dtype=torch.float64)) + 3.0


def test_refusal_score_is_the_paper_log_odds():
    scores = refusal_score(torch.cat([_logits_with_refusal_mass(p) for p in (0.5, 0.9, 0.1)]), [0])
    assert scores[0].item() == pytest.approx(0.0, abs=1e-12)
    assert scores[1].item() == pytest.approx(math.log(0.9 + 1e-8) - math.log(0.1 + 1e-8), abs=1e-9)
    assert scores[2].item() == pytest.approx(-scores[1].item(), abs=1e-9)


def test_refusal_score_sums_several_tokens_and_stays_finite_at_certainty():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # P = 0.25 each; two refusal tokens make P_R = 0.5
    assert refusal_score(logits, [1, 3]).item() == pytest.approx(0.0, abs=1e-12)
    certain = torch.tensor([[1000.0, 0.0, 0.0]], dtype=torch.float32)  # P_R rounds to 1 in float32
    assert refusal_score(certain, [0]).item() == pytest.approx(-math.log(1e-8), rel=1e-6)


def test_a_shared_opening_adds_the_refusals_that_follow_it_weighted_by_its_probability():
    """P_R = P(refusal token) + P(shared token) * P(refusal token after it): "Désolé" 0.3, "Je" 0.5 then "ne" 0.6."""
    from abliterate.activations import RefusalTokens

    root = torch.log(torch.tensor([[0.3, 0.5, 0.2]], dtype=torch.float64))  # Désolé, Je, other
    after = torch.log(torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64))  # other, ne, vais
    tokens = RefusalTokens([0], shared=1, after_shared=[1])
    p_refusal = 0.3 + 0.5 * 0.6
    expected = math.log(p_refusal + 1e-8) - math.log(1 - p_refusal + 1e-8)
    assert refusal_score(torch.stack([root, after], dim=1), tokens).item() == pytest.approx(expected, abs=1e-12)
    # longer tails read their last two positions; a plain token list reads the last one
    three = torch.stack([after, root, after], dim=1)
    assert refusal_score(three, tokens).item() == pytest.approx(expected, abs=1e-12)
    assert refusal_score(three, [1]).item() == pytest.approx(math.log(0.6 + 1e-8) - math.log(0.4 + 1e-8), abs=1e-9)
    with pytest.raises(ValueError, match="reads two positions"):
        refusal_score(root, tokens)


def test_kl_divergence_matches_its_definition():
    base = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]), dim=-1)
    new = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 5.0]]), dim=-1)
    expected = (base.exp() * (base - new)).sum(-1)
    kl = kl_divergence(base, new)
    assert torch.allclose(kl, expected.double(), atol=1e-7)
    assert kl[1].item() == 0.0 and kl[0].item() > 0


def test_difference_of_means_in_float64():
    harmful = torch.full((2, 3, 4), 1.0, dtype=torch.float32)
    harmless = torch.full((2, 3, 4), 1e-9, dtype=torch.float64)
    diff = difference_of_means(harmful, harmless)
    assert diff.dtype == torch.float64 and diff[0, 0, 0].item() == 1.0 - 1e-9
    with pytest.raises(ValueError, match="shapes differ"):
        difference_of_means(harmful, harmless[:1])


# ---- filters and the choice ----

def _score(layer: int, bypass: float, kl: float = 0.0, induce: float = 1.0, position: int = -1) -> CandidateScore:
    return CandidateScore(position=position, layer=layer, bypass=bypass, kl=kl, induce=induce)


def test_filters_follow_the_paper():
    config = MeasureConfig()
    n_layers = 10  # int(0.8 * 10) = 8: layers 8 and 9 are discarded
    assert failed_filters(_score(7, -3.0), n_layers, config) == []
    assert failed_filters(_score(8, -3.0), n_layers, config) == ["layer >= 8"]
    assert failed_filters(_score(1, -3.0, kl=0.2), n_layers, config) == ["kl > 0.1"]
    assert failed_filters(_score(1, -3.0, induce=-0.5), n_layers, config) == ["induce < 0"]
    assert failed_filters(_score(1, -3.0, induce=0.0), n_layers, config) == []  # the paper discards induce < 0 only
    assert failed_filters(_score(1, float("nan")), n_layers, config) == ["nan score"]
    assert failed_filters(_score(1, -3.0, induce=-1.0), n_layers, MeasureConfig(require_induce=False)) == []
    assert failed_filters(_score(9, -3.0, induce=float("nan")), n_layers, config, induce_known=False) == ["layer >= 8"]


def test_choose_takes_the_lowest_passing_bypass():
    config, n_layers = MeasureConfig(), 10
    scores = [_score(9, -9.0), _score(2, -5.0, kl=0.5), _score(3, -4.0), _score(4, -2.0), _score(5, -6.0, induce=-1)]
    for s in scores:
        s.failed = failed_filters(s, n_layers, config)
    best = choose(scores)
    assert (best.layer, best.bypass, best.chosen) == (3, -4.0, True)
    assert sum(s.chosen for s in scores) == 1


def test_nothing_passes_lists_the_best_with_the_filter_each_failed():
    config, n_layers = MeasureConfig(), 10
    # The last candidate is from a discarded layer and was never scored: it is counted apart and listed last.
    scores = [_score(9, -9.0), _score(2, -5.0, kl=0.5, position=-2), _score(3, 1.0, induce=-1),
              _score(9, math.nan, kl=math.nan, induce=math.nan, position=-2)]
    for s in scores:
        s.failed = failed_filters(s, n_layers, config)
    with pytest.raises(NoDirectionError) as caught:
        choose(scores)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("No candidate direction passed the filters (3 of 4 scored;")
    assert lines[4].startswith("  pos  -2 layer   9: bypass nan")
    assert lines[1] == "  pos  -1 layer   9: bypass -9.000 kl 0.0000 induce 1.000  failed: layer >= 8"
    assert lines[2] == "  pos  -2 layer   2: bypass -5.000 kl 0.5000 induce 1.000  failed: kl > 0.1"
    assert lines[3].endswith("failed: induce < 0")
    assert lines[-1].startswith("Hint: relax the failing filter (measure.kl_max")
    assert isinstance(caught.value, UserError)


def test_too_few_filtered_prompts_is_a_user_error_naming_the_cause():
    check_kept("harmful", 2, 20, "training")  # 10% is enough
    with pytest.raises(UserError) as caught:
        check_kept("harmful", 1, 32, "training")
    assert str(caught.value).startswith(
        "Only 1 of 32 harmful training prompts are ones the base model refuses (at least 4 needed); "
        "this usually means the chat template is wrong")
    with pytest.raises(UserError, match="Only 0 of 4 harmless validation prompts are ones the base model does not"):
        check_kept("harmless", 0, 4, "validation")


# ---- on a tiny random model ----

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _batches(lengths: list[int], batch_size: int, seed: int) -> list[Batch]:
    """Left-padded random token batches (rows in given order)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        width = max(chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [batch, pos]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [batch, pos]
        for row, length in enumerate(chunk):
            ids[row, width - length:] = torch.randint(1, 50, (length,), generator=generator)
            mask[row, width - length:] = 1
        batches.append(Batch(ids, mask, list(range(start, start + len(chunk)))))
    return batches


def test_mean_activations_match_hidden_states_and_filter_by_score(tiny):
    batches = _batches([5, 7, 6, 9, 4, 8], batch_size=4, seed=1)
    k, refusal_ids = 3, [7, 8]
    expected_rows, scores = [], []
    with torch.no_grad():
        for batch in batches:
            out = tiny(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
            layers = torch.stack(out.hidden_states[:4], dim=2)[:, -k:, :, :].double()  # [batch, pos, layer, d]
            expected_rows.append(layers)
            scores.append(refusal_score(out.logits[:, -1], refusal_ids))
    rows, scores = torch.cat(expected_rows), torch.cat(scores)
    every = mean_activations(tiny, batches, k, refusal_ids)
    assert every.mean.dtype == torch.float64 and every.mean.shape == (k, 4, 32)
    assert torch.allclose(every.mean, rows.mean(0), atol=1e-6)
    assert torch.allclose(every.scores, scores, atol=1e-5)
    for sign in (1, -1):
        kept = scores * sign > 0
        side = mean_activations(tiny, batches, k, refusal_ids, keep_sign=sign)
        assert side.n_kept == int(kept.sum())
        if side.n_kept:
            assert torch.allclose(side.mean, rows[kept].mean(0), atol=1e-6)


def test_with_continuations_the_positions_end_before_each_rows_own_and_the_last_is_its_decision(tiny):
    """Rows followed by continuations of their own lengths (a prompt's reasoning up to its decision): the first
    k - 1 positions are the ones just before the continuation, the last is the row's last position."""
    batches = _batches([9, 6, 8], batch_size=3, seed=2)
    (batch,) = batches
    tails = [3, 0, 2]
    batch.tails = tails
    k = 3
    with torch.no_grad():
        out = tiny(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states[:4], dim=2).double()  # [batch, pos, layer, d]
    width = batch.input_ids.shape[1]
    expected = torch.stack([torch.cat([hidden[row, width - tail - (k - 1):width - tail], hidden[row, -1:]])
                            for row, tail in enumerate(tails)])  # [batch, k, layer, d]
    side = mean_activations(tiny, [batch], k, [7])
    assert torch.allclose(side.mean, expected.mean(0), atol=1e-6)
    # Scores are read at each row's last position: where its continuation ends.
    assert torch.allclose(side.scores, refusal_score(out.logits[:, -1], [7]), atol=1e-5)


def test_in_text_order_undoes_length_sorting():
    class Chars:  # a tokenizer stand-in: one token per character
        padding_side = "right"

        def __call__(self, texts, padding, return_tensors, add_special_tokens):
            width = max(len(t) for t in texts)
            ids = torch.tensor([[0] * (width - len(t)) + [ord(c) for c in t] for t in texts])
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    texts = ["ccc", "a", "bb", "dddd", "e"]
    batches = encode(Chars(), texts, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]
    per_batch = [b.attention_mask.sum(1) for b in batches]  # each row's length
    assert in_text_order(batches, per_batch).tolist() == [3, 1, 2, 4, 1]


def _split_batches(lengths: list[int], is_harmful: list[bool], seed: int) -> tuple[list[Batch], ...]:
    """One mixed batch of random rows, and the same rows as a harmful-only and a harmless-only batch."""
    (mixed,) = _batches(lengths, batch_size=len(lengths), seed=seed)

    def side(wanted: bool) -> list[Batch]:
        rows = [row for row, harmful in enumerate(is_harmful) if harmful == wanted]
        keep = mixed.attention_mask[rows].sum(0) > 0  # drop the columns only the other side pads into
        return [Batch(mixed.input_ids[rows][:, keep], mixed.attention_mask[rows][:, keep], list(range(len(rows))))]

    return [mixed], side(True), side(False)


def test_bypass_and_kl_passes_equal_the_shared_pass(tiny):
    """The harmful-only bypass pass and the harmless-only KL pass give what one pass over both sides gives."""
    from abliterate.selection import ablated_kl, bypass_and_kl, bypass_score

    flags = [True, False, True, False, False]
    batches, harmful, harmless = _split_batches([6, 5, 7, 6, 8], flags, seed=7)
    val = build_validation_set(tiny, batches, harmless, torch.tensor(flags), [3, 4], harmful_batches=harmful)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bypass, kl = bypass_and_kl(tiny, direction, val, [3, 4])
    assert bypass_score(tiny, direction, val, [3, 4]) == pytest.approx(bypass, rel=1e-5)
    assert ablated_kl(tiny, direction, val) == pytest.approx(kl, rel=1e-3)  # padding differs: float noise
    assert kl > 0


def test_pruned_search_chooses_what_the_full_search_chooses(tiny):
    from abliterate.selection import KL_NOT_SCORED

    torch.manual_seed(3)
    candidates = torch.randn(2, 4, 32, dtype=torch.float64) * 3  # [position, layer, d_model]
    flags = [True, True, True, False, False, False]
    batches, harmful, harmless = _split_batches([6, 5, 7, 6, 8, 5], flags, seed=2)
    refusal_ids = [3, 4, 5]
    val = build_validation_set(tiny, batches, harmless, torch.tensor(flags), refusal_ids, harmful_batches=harmful)
    for kl_max, require_induce in ((float("inf"), False), (0.02, False), (float("inf"), True), (0.05, True)):
        config = MeasureConfig(kl_max=kl_max, require_induce=require_induce)
        full = score_candidates(tiny, candidates, val, refusal_ids, MeasureConfig(**{**vars(config), "score_all": True}))
        pruned = score_candidates(tiny, candidates, val, refusal_ids, config)
        kept = [s for s in pruned if s.layer < 3]  # int(0.8 * 4) = 3: layer 3 is never chosen
        assert [s.bypass for s in full if s.layer < 3] == [s.bypass for s in kept]
        assert all(math.isnan(b.kl) or a.kl == b.kl for a, b in zip([s for s in full if s.layer < 3], kept))
        assert all(math.isnan(s.bypass) and s.failed == ["layer >= 3"] for s in pruned if s.layer == 3)
        assert all(not math.isnan(s.induce) for s in full)
        assert sum(not math.isnan(s.induce) for s in pruned) < len(pruned)
        # A candidate whose KL or induce pass was pruned never reads as a pass (an empty list of failed filters).
        assert all(s.failed for s in pruned if math.isnan(s.induce) or math.isnan(s.kl))
        assert {s.failed[0] for s in pruned if math.isnan(s.induce)} <= {INDUCE_NOT_SCORED, KL_NOT_SCORED,
                                                                        "layer >= 3", f"kl > {kl_max:g}"}
        try:
            best_full = choose(full)
        except NoDirectionError:
            with pytest.raises(NoDirectionError):
                choose(pruned)
            continue
        best = choose(pruned)
        assert (best.position, best.layer, best.induce) == (best_full.position, best_full.layer, best_full.induce)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "phi", "falcon", "gpt_neox", "qwen3_moe", "jamba"])
def test_activations_are_layer_inputs_on_other_families(family):
    """Conv1D, sandwich norms, parallel blocks, MoE, hybrid: the means are the layer inputs, and the ablation the
    candidates are scored with leaves every recorded layer input orthogonal to the direction."""
    from tiny_models import VOCAB, build_tiny

    from abliterate.activations import _last_positions
    from abliterate.hooks import ablate_direction, decoder_layers

    model = build_tiny(family)
    n_layers = len(decoder_layers(model))
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 7), generator=generator)  # [batch, pos]
    batch = Batch(ids, torch.ones_like(ids), [0, 1, 2])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = torch.stack(hidden[:n_layers], dim=1)[:, :, -2:, :].double().mean(0).transpose(0, 1)
    side = mean_activations(model, [batch], 2, [5])
    assert side.mean.shape == (2, n_layers, model.config.get_text_config().hidden_size)
    assert torch.allclose(side.mean, expected, atol=1e-5)
    direction = side.mean[1, n_layers // 2]  # [d_model]
    unit = direction / direction.norm()
    with ablate_direction(model, direction), _last_positions(model, 7) as captured, torch.no_grad():
        model(input_ids=ids)
    assert max(float((captured[i] @ unit).abs().max()) for i in range(n_layers)) < 1e-4


def test_kl_covers_the_positions_of_a_teacher_forced_reply_prefix(tiny):
    """With a reply prefix, the KL also reads the positions that predict the prefix's tokens: an edit that keeps the
    scored position but changes how the reply opens is not harmless."""
    from abliterate.hooks import ablate_direction
    from abliterate.selection import bypass_and_kl, tail_log_probs

    torch.manual_seed(4)
    direction = torch.randn(32, dtype=torch.float64)
    batches = _batches([6, 5, 7, 6], batch_size=4, seed=5)
    harmless = _batches([6, 7], batch_size=4, seed=5)
    is_harmful = torch.tensor([True, True, False, False])
    last = build_validation_set(tiny, batches, harmless, is_harmful, [3, 4])
    tail = build_validation_set(tiny, batches, harmless, is_harmful, [3, 4], kl_positions=3)
    assert tail.base_log_probs.shape[1] == 3 and torch.equal(tail.base_scores, last.base_scores)
    (bypass_last, kl_last), (bypass_tail, kl_tail) = (bypass_and_kl(tiny, direction, v, [3, 4]) for v in (last, tail))
    assert bypass_tail == pytest.approx(bypass_last, rel=1e-6)
    with ablate_direction(tiny, direction):
        edited = tail_log_probs(tiny, batches, 3)[~is_harmful]  # [n_harmless, 3, vocab]
    per_position = [float(kl_divergence(tail.base_log_probs[:, p], edited[:, p]).mean()) for p in range(3)]
    assert kl_last == pytest.approx(per_position[-1], rel=1e-6)
    assert kl_tail == pytest.approx(sum(per_position) / 3, rel=1e-6)


def test_a_chosen_direction_that_leaves_refusal_in_place_is_warned_about(caplog):
    """The paper's filters can exclude every candidate whose ablation removes refusal: the choice is still made (as
    the paper does), with a warning that names the best excluded candidate and the filter it failed."""
    kept = CandidateScore(position=-8, layer=1, bypass=3.2, kl=0.02, induce=1.8)
    excluded = CandidateScore(position=-1, layer=3, bypass=-0.3, kl=0.11, induce=math.nan, failed=["kl > 0.1"])
    with caplog.at_level(logging.WARNING, logger="abliterate.selection"):
        assert choose([kept, excluded]) is kept
    assert "mean refusal score at 3.200" in caplog.text
    assert "-0.300 at layer 3, position -1, failed: kl > 0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="abliterate.selection"):
        choose([CandidateScore(position=-1, layer=2, bypass=-1.0, kl=0.01, induce=1.0)])
    assert caplog.text == ""
