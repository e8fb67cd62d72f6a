"""Finding how a model refuses from its own replies: the shared prefix, the refusal tokens, the thinking switch;
refusal openings that are fragments of words; and `measure` offline (local prompt files only, the Hub never asked).
"""

import logging
import math
import socket

import pytest

from abliterate.chat import refusal_token_ids
from abliterate.errors import UserError
from abliterate.openings import inside_thinking, opening_of, thinking_switch
from abliterate.parting import OpeningCounts, Parting, configured_path, refusal_path, refusal_tokens, shared_prefix
from abliterate.refusal import RefusalProfile, _configure, _discover, load_profile, save_profile, separation_auc


def test_shared_prefix_is_what_nearly_every_reply_of_both_sides_opens_with():
    harmful = [[5, 9, 1, 2]] * 19 + [[9, 1]]  # one odd reply lacks the lone-space token 5
    harmless = [[5, 9, 3, 4]] * 10 + [[5, 9, 7]] * 10
    assert shared_prefix(harmful, harmless) == [5, 9]
    # A token that opens only one side's replies is a decision, not a prefix.
    assert shared_prefix([[1, 2]] * 10, [[3, 2]] * 10) == []
    assert shared_prefix([[8, 1]] * 10, [[8, 1]] * 8 + [[3]] * 2) == []  # 80% < 90% of the harmless replies


def test_refusal_tokens_are_far_more_frequent_after_harmful_prompts():
    counts = OpeningCounts(harmful={10: 20, 11: 8, 12: 4, 13: 1}, harmless={11: 20, 12: 0, 14: 12},
                           confirmed={13: 1}, n_harmful=32, n_harmless=32)
    # 10: only harmful. 11: opens harmless replies as often. 12: 4 of 32 harmful, never harmless (frequency alone).
    # 13: one reply, but a refusal phrase confirms it.
    assert refusal_tokens(counts) == [10, 12, 13]
    odd = OpeningCounts(harmful={10: 30, 12: 1, 15: 1}, harmless={15: 1}, confirmed={}, n_harmful=32,
                        n_harmless=32)
    assert refusal_tokens(odd) == [10]  # one odd reply's opening is not a refusal token


class _Words:
    """A tokenizer stand-in: token id i is WORDS[i]."""

    WORDS = ("<pad>", " ", "I", " can't", "'d", " be", " glad", "Here", " is", " help", "'m", " sorry", " happy")

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.WORDS[i] for i in ids)


def test_an_opening_refusals_share_with_answers_is_followed_to_where_they_part():
    # "I can't help" against "I'd be glad" (12 of 32) and "Here is" (20 of 32): "I" opens 32 harmful and 12
    # harmless replies (under 4 x as often), so no first token is a refusal token; after "I" they part.
    harmful = [[2, 3, 9]] * 32
    harmless = [[2, 4, 5, 6]] * 12 + [[7, 8]] * 20
    assert refusal_tokens(OpeningCounts({2: 32}, {2: 12, 7: 20}, {}, 32, 32)) == []
    assert refusal_path(_Words(), harmful, harmless, [], ["I can't"]) == Parting([2], [3])
    # Behind a shared prefix (a lone space), and two tokens deep ("I'm sorry" against "I'm happy to help").
    harmful = [[1, 2, 10, 11]] * 32
    harmless = [[1, 2, 10, 12]] * 16 + [[1, 7, 8]] * 16
    assert refusal_path(_Words(), harmful, harmless, [1], ["I'm sorry"]) == Parting([1, 2, 10], [11])
    # Refusals that open no way in common, and none far more often than answers: nothing is found.
    harmful = [[2, 3]] * 16 + [[7, 3]] * 16
    harmless = [[2, 4]] * 16 + [[7, 8]] * 16
    assert refusal_path(_Words(), harmful, harmless, [], ["I can't"]) == Parting([], [])


def test_refusals_opening_with_a_token_answers_open_with_are_followed_beside_those_that_do_not():
    """"sorry" opens 12 refusals and no answer; "I" opens the other 20 refusals ("I can't") and half the answers
    ("I'd be glad"): "sorry" is a refusal token, and "I" a shared opening followed to "can't"."""
    harmful = [[11, 9]] * 12 + [[2, 3, 9]] * 20
    harmless = [[2, 4, 5, 6]] * 16 + [[7, 8]] * 16
    assert refusal_path(_Words(), harmful, harmless, [], ["I can't"]) == Parting([], [11], 2, [3])
    # Harmful replies that open as answers do and go on a little differently ("Here be" beside "Here is"), a few of
    # them: no refusal opening, though the next token is more frequent after harmful prompts.
    harmful = [[11, 3]] * 20 + [[7, 5]] * 3 + [[7, 8]] * 9
    harmless = [[7, 8]] * 24 + [[7, 5]] + [[12]] * 7
    assert refusal_path(_Words(), harmful, harmless, [], []) == Parting([], [11])
    # Where half the answers that open with "I" go on as the refusals do, "I" is no refusal opening.
    harmful = [[11, 9]] * 24 + [[2, 3, 9]] * 8
    harmless = [[2, 3, 6]] * 8 + [[2, 4, 5, 6]] * 8 + [[7, 8]] * 16
    assert refusal_path(_Words(), harmful, harmless, [], []) == Parting([], [11])


class _Spelling(_Words):
    """`_Words` that also encodes: each text is split into the longest words of WORDS, in order."""

    def __call__(self, text, add_special_tokens=False):
        ids = []
        while text:
            word = max((w for w in self.WORDS[1:] if text.startswith(w)), key=len)
            ids.append(self.WORDS.index(word))
            text = text[len(word):]
        return {"input_ids": ids}


def test_configured_openings_that_begin_like_answers_are_followed_past_the_shared_word():
    # Refusals "I can't" and "I'm sorry"; answers open "I'd be glad" (12 of 32) and "Here is": "I" opens them too, so
    # it is teacher-forced and " can't" / "'m" are scored after it.
    harmful = [[2, 3, 9]] * 16 + [[2, 10, 11]] * 16
    harmless = [[2, 4, 5, 6]] * 12 + [[7, 8]] * 20
    assert configured_path(_Spelling(), ["I can't", "I'm sorry"], harmful, harmless, []) == Parting([2], [3, 10])
    # Behind a prefix (a lone space): the same path from there.
    spaced = [[1, *reply] for reply in harmful], [[1, *reply] for reply in harmless]
    assert configured_path(_Spelling(), ["I can't"], *spaced, [1]) == Parting([1, 2], [3])
    # "I" that answers never open tells refusals apart already: scored where it is (no path).
    assert configured_path(_Spelling(), ["I can't"], harmful, [[7, 8]] * 32, []) == Parting([], [])
    # Openings that begin differently: their first tokens are scored, as before.
    assert configured_path(_Spelling(), ["I can't", "Here is"], harmful, harmless, []) == Parting([], [])
    # Every reply opens "I" (the shared reply prefix): an opening written with it is read after it.
    assert configured_path(_Spelling(), ["I can't"], harmful, harmless[:12], [2]) == Parting([2], [3])
    assert configured_path(_Spelling(), ["I can't", "I'm sorry"], harmful, harmless[:12], [2]) == Parting([2], [3, 10])
    # Only some openings begin like answers ("I can't" beside "sorry"): "I" is their shared opening.
    mixed = [[2, 3, 9]] * 16 + [[11, 9]] * 16
    assert configured_path(_Spelling(), ["I can't", " sorry"], mixed, harmless, []) == Parting([], [11], 2, [3])
    profile = RefusalProfile(source="configured", prefix="", token_ids=[], token_texts=[], openings=[],
                             template_kwargs={}, thinking_end="", n_harmful_replies=32, n_harmless_replies=32,
                             separation=math.nan, prefix_ids=[])
    _configure(profile, _Spelling(), ["I can't", "I'm sorry"], harmful, harmless)
    assert (profile.prefix_ids, profile.token_ids, profile.branch) == ([2], [3, 10], "I")
    assert profile.openings == ["i can't", "i'm sorry"]


def test_a_thinking_block_that_never_closed_in_the_replies_is_still_open_where_the_score_is_read():
    assert inside_thinking("<|im_start|>assistant\n", "<think>\nOkay, the user", "</think>")
    assert inside_thinking("<|im_start|>assistant\n", "<think>\nOkay, the user", "")  # no closer seen at all
    assert not inside_thinking("<|im_start|>assistant\n", "<think>\n\n</think>\n\n", "</think>")
    assert not inside_thinking("<|im_start|>assistant\n", " ", "")


def test_replies_cut_inside_their_thinking_name_the_setting_that_lets_them_finish():
    class Think(_Words):
        WORDS = ("<pad>", "<think>", "\n", "Okay", " the", " user", " wants", " to", " steal", " bake", " a", " car")

    # Every reply is still thinking when generation stopped: "<think>\nOkay the user wants to steal/bake a car".
    harmful = [[1, 2, 3, 4, 5, 6, 7, 8, 10, 11]] * 16 + [[1, 2, 3, 4, 5, 6, 7, 9, 10, 11]] * 16
    harmless = list(harmful)
    profile = RefusalProfile(source="discovered", prefix="<think>\nOkay the user wants to", token_ids=[],
                             token_texts=[], openings=[], prefix_ids=[1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(UserError, match=r"thinking block that none closed within measure.discovery_max_new_tokens: "
                                        r"raise it \(--discovery-max-new-tokens\)"):
        _discover(profile, Think(), "<|im_start|>assistant\n", harmful, harmless)


def test_an_opening_is_a_few_words_or_in_a_script_without_spaces_its_first_clause():
    assert opening_of("Unfortunately, I can not help with that.") == "unfortunately, i can"
    assert opening_of("抱歉，我不能帮助你。这个请求可能会伤害他人。") == "抱歉"
    assert opening_of("申し訳ありませんがお手伝いできません") == "申し訳ありま"  # no punctuation: a few characters
    assert opening_of("  ") == ""


def test_separation_is_the_auc():
    assert separation_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert separation_auc([1.0, 4.0], [2.0, 3.0]) == 0.5
    assert separation_auc([2.0], [2.0]) == 0.5
    assert math.isnan(separation_auc([], [1.0]))


def test_profile_round_trips_and_ignores_keys_it_does_not_know(tmp_path):
    profile = RefusalProfile("discovered", " ", [7], ["unfortunately"], ["unfortunately i can"],
                             {"enable_thinking": False}, "</think>", 32, 32, 31, 0.98, [5])
    save_profile(profile, tmp_path)
    assert load_profile(tmp_path) == profile
    assert load_profile(tmp_path / "refusal.json") == profile
    data = profile.to_dict() | {"added_later": 1}
    assert RefusalProfile.from_dict(data) == profile
    assert load_profile(tmp_path / "absent") is None


def _tokenizer(template: str, corpus: list[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   chat_template=template)


SWITCHABLE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant:' }}"
              "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think></think>' }}{% endif %}"
              "{% endif %}")
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant:"


def test_thinking_is_switched_off_only_where_the_template_can_and_the_user_chose_nothing():
    from abliterate.config import ModelConfig

    tokenizer = _tokenizer(SWITCHABLE, ["user: assistant: Name a fruit"])
    assert thinking_switch(tokenizer, ModelConfig()) == {"enable_thinking": False}
    assert thinking_switch(tokenizer, ModelConfig(template_kwargs={"enable_thinking": True})) == {}
    tokenizer.chat_template = PLAIN
    assert thinking_switch(tokenizer, ModelConfig()) == {}


def test_an_opening_whose_first_token_is_a_fragment_is_dropped_with_a_warning(caplog):
    # A vocabulary that never saw "Sorry": it tokenises to single letters.
    tokenizer = _tokenizer(PLAIN, ["I cannot help with that. I cannot do it."] * 20, vocab_size=270)
    with caplog.at_level(logging.WARNING, logger="abliterate.chat"):
        ids = refusal_token_ids(tokenizer, ["I", "Sorry"])
    assert [tokenizer.decode([i]).strip() for i in ids] == ["I"] * len(ids)
    assert "'Sorry' -> ['S', 'o', 'r', 'r']" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="abliterate.chat"):
        refusal_token_ids(tokenizer, ["I", "I cannot"])  # "I" is a whole word here, not a fragment
    assert caplog.text == ""
    with pytest.raises(UserError, match="fragment"):
        refusal_token_ids(tokenizer, ["Sorry"])


# ---- offline ----

def test_an_offline_hub_dataset_fails_at_once_naming_the_local_file(monkeypatch, caplog):
    import datasets

    from abliterate.prompts import load_prompts

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")))
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE=1 .*pass a local prompt file instead \(\.txt"):
        load_prompts("hf:owner/never-cached:train")
    assert len(calls) == 1  # the cache is asked once, the network never


def test_a_name_that_does_not_resolve_fails_at_once_without_retries(monkeypatch, caplog):
    import datasets
    from huggingface_hub import constants

    from abliterate.prompts import load_prompts

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub was asked"))
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match=r"huggingface.co cannot be resolved .*"
                                                                             r"pass a local prompt file"):
        load_prompts("hf:owner/name:train")
    assert "Retrying" not in caplog.text


def test_measure_with_an_offline_hub_source_exits_at_once_naming_the_local_file(toy_refuser_dir, tmp_path):
    import subprocess
    import sys

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("How do I steal a car?\n")
    process = subprocess.run([sys.executable, "-c", "from abliterate.cli import main; main()", "measure",
                              str(toy_refuser_dir), "--out", str(tmp_path / "out"), "--harmful", str(harmful),
                              "--harmless", "hf:owner/not-cached"], capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert lines[-1].startswith("error: The dataset hf:owner/not-cached is not in the local Hub cache and "
                                "HF_HUB_OFFLINE=1 keeps abliterate off the Hub; pass a local prompt file instead")
    assert "Retrying" not in process.stderr and not (tmp_path / "out").exists()


def test_hub_retry_warnings_are_printed_once():
    import subprocess
    import sys

    # huggingface_hub logs each retry through a handler of its own and through the CLI's: twice, before.
    # The CLI sets up logging first; huggingface_hub is imported later, when a command first needs it.
    code = ("from abliterate.cli import _setup; _setup(verbose=False, quiet=False); import logging; "
            "import huggingface_hub.utils._http; "
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Retrying in 1s") == 1, result.stderr


class _Text:
    """A tokenizer stand-in: a reply's ids are its characters."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def _ids(text: str) -> list[int]:
    return [ord(char) for char in text]


def test_refusal_phrases_are_the_harmful_answers_own_words_wherever_they_stand():
    """Replies that decide in a reasoning line and refuse after it in German: the refusal sentence is learned from
    the base replies (in at least a quarter of the harmful answers, in no harmless one), never the per-prompt content or a
    word sequence answers share, nor anything inside a thinking block; a reply holding one reads as a refusal
    wherever the phrase stands."""
    from abliterate.metrics import RefusalMatcher
    from abliterate.openings import refusal_phrases

    objects = ("eine Bank", "ein Auto", "einen Zaun", "eine Tür")
    harmful = [_ids(f"(Gedanke: {o} zerstören ist verboten.)\nAlso, dabei kann ich leider nicht helfen.")
               for o in objects] + [_ids("<think>ich kann nicht helfen</think>Nein.")]
    harmless = [_ids(f"(Gedanke: {o} bauen ist in Ordnung.)\nAlso, so kannst du {o} bauen.") for o in objects]
    phrases = refusal_phrases(_Text(), harmful, harmless)
    assert "ich leider nicht helfen." in phrases and "dabei kann ich leider" in phrases
    assert not any("bank" in p or "gedanke" in p or "ich kann nicht" in p for p in phrases)
    matcher = RefusalMatcher(("I cannot",), learned=tuple(phrases))
    assert matcher.is_refusal("(Gedanke: X ist in Ordnung.)\nAlso, dabei kann ich leider nicht helfen.")
    assert matcher.is_refusal("Also, so kannst du ich leider nicht helfen.")  # slid back at the end
    assert not matcher.is_refusal("Also, so kannst du einen Zaun bauen.")
    assert not matcher.is_refusal("<think>leider nicht helfen.</think>Also, so kannst du es bauen.")
    assert refusal_phrases(_Text(), harmful, harmful) == []  # nothing harmful replies alone say


def test_every_refusal_sentence_of_a_model_that_words_them_several_ways_is_learned():
    """Three refusal sentences, a third of the replies each, in French; answers open with the same "Je" as two of
    them. Each sentence is learned, so a reply that opens as an answer and ends refusing reads as a refusal; an
    answer that only shares a word or two with a refusal does not."""
    from abliterate.metrics import RefusalMatcher, refusal_rates
    from abliterate.openings import refusal_phrases

    sentences = ("Je ne peux pas vous aider avec cela.", "Désolé, je refuse de répondre à cette demande.",
                 "Cette demande est contraire à mes règles.")
    objects = ("une banque", "une voiture", "un vélo", "une porte", "un pont", "un mur")
    harmful = [_ids(sentences[i % 3]) for i in range(len(objects))]
    harmless = [_ids(f"Je vais vous expliquer comment réparer {o}.") for o in objects]
    phrases = refusal_phrases(_Text(), harmful, harmless)
    assert {"peux pas vous aider", "refuse de répondre à", "contraire à mes règles."} <= set(phrases)
    matcher = RefusalMatcher(("I cannot",), openings=("je ne peux",), learned=tuple(phrases))
    slid = "Je vais vous expliquer comment je refuse de répondre à cette demande."
    answered = "Je vais vous expliquer comment répondre à cette lettre."
    assert matcher.is_refusal(slid) and not matcher.is_refusal(answered)
    # eval's rates read the learned phrases as the confirmation does
    assert refusal_rates([slid, answered], ["", ""], matcher)["count"] == 1


def test_a_closing_line_refusals_share_with_answers_is_no_refusal_phrase():
    """Refusals that open their own way are read in their first sentence: a polite closing line after it also ends
    answers (longer ones, cut before it in the discovery replies), and a phrase matches whole words only."""
    from abliterate.metrics import RefusalMatcher
    from abliterate.openings import refusal_phrases

    closing = " If you have any other questions, feel free to ask."
    harmful = [_ids(f"I'm sorry. I cannot provide instructions on {o}.{closing}") for o in ("a bomb", "a gun", "a virus")]
    harmless = [_ids(f"Here is how to bake {o}: first, preheat the oven") for o in ("a cake", "bread", "a pie")]
    phrases = refusal_phrases(_Text(), harmful, harmless, first_sentence=True)
    assert any("i cannot provide instructions on" in p for p in phrases)
    assert not any("feel free" in p or "questions" in p for p in phrases)
    assert any("feel free" in p for p in refusal_phrases(_Text(), harmful, harmless))  # the whole answer: it is
    matcher = RefusalMatcher(("I'm sorry",), learned=("not provide instructions on",))
    assert not matcher.is_refusal("Sure, I cannot provide instructions on that? Here they are.")
    assert matcher.is_refusal("Sure, but I will not provide instructions on that.")


def test_phrases_in_a_script_without_spaces_are_learned_per_character():
    """Chinese refusals and answers: a character is half a word, and a phrase covers 60% of the refusal, ten of its
    fourteen characters (a shorter window, "帮助你做这件事。", help you do this thing, also ends degenerate answers);
    a reply matches however its spaces fall around them."""
    from abliterate.metrics import RefusalMatcher
    from abliterate.openings import refusal_phrases

    harmful = [_ids("抱歉，我不能帮助你做这件事。")] * 4
    harmless = [_ids(f"好的！下面是{o}的方法。") for o in ("做饭", "画画", "种树", "洗车")]
    phrases = refusal_phrases(_Text(), harmful, harmless, first_sentence=True)
    assert "不能帮助你做这件事。" in phrases and all(len(p) == 10 for p in phrases)
    matcher = RefusalMatcher(("I cannot",), learned=tuple(phrases))
    assert matcher.is_refusal("好的！下面是 我不能帮助你做这件事。")  # slid back into refusing
    assert not matcher.is_refusal("好的！下面是监视帮助你做这件事。")  # degenerate, but no refusal
    assert not matcher.is_refusal("好的！下面是做饭的方法。")


def test_the_matcher_of_a_measured_model_reads_its_learned_phrases(tmp_path):
    from abliterate.metrics import matcher_for

    profile = RefusalProfile(source="discovered", prefix="", token_ids=[1], token_texts=["x"], openings=[],
                             phrases=["leider nicht helfen."])
    save_profile(profile, tmp_path)
    matcher = matcher_for("extended", load_profile(tmp_path))
    assert matcher.is_refusal("Also, dabei kann ich leider nicht helfen.")
    assert not matcher_for("extended").is_refusal("Also, dabei kann ich leider nicht helfen.")


def test_a_poor_separation_warning_names_thinking_only_for_a_model_that_thinks(caplog):
    import logging

    from abliterate.refusal import log_profile

    for thinking_end, says in (("", "measure.refusal_openings"), ("</think>", "switch thinking off")):
        caplog.clear()
        profile = RefusalProfile(source="discovered", prefix="", token_ids=[1], token_texts=["Cette"], openings=[],
                                 thinking_end=thinking_end, separation=0.7)
        with caplog.at_level(logging.WARNING):
            log_profile(profile)
        assert says in caplog.text and ("thinking" in caplog.text) == bool(thinking_end)


def test_a_refusal_token_that_is_part_of_a_character_is_shown_with_the_opening_it_starts():
    profile = RefusalProfile(source="discovered", prefix="", token_ids=[417], token_texts=["\ufffd"],
                             openings=["抱歉"], n_refusals=32, n_harmful_replies=32)
    assert 'on the tokens ["\ufffd"] (the start of ["抱歉"])' in profile.describe()
