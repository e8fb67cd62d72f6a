"""Chat formatting derived from templates, never hard-coded: end-of-instruction tokens on four template styles,
end-of-turn and stop tokens, refusal tokens, the no-template error, and the tokenizer side of load_model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from abliterate.chat import (
    end_of_instruction_ids,
    end_of_turn_ids,
    format_instructions,
    refusal_token_ids,
    stop_token_ids,
)
from abliterate.errors import UserError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<think>", "</think>"]
CORPUS = ["I cannot help. I'm sorry. As an AI I can't. Sure, here is a fruit.", "assistant user system model",
          "[INST] Name a fruit [/INST] Describe the weather", "As I said, I am I. As you wish."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer with the special tokens of every template style above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _model_config(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"system_prompt": "", "template_kwargs": {}, "chat_template": "", **overrides})


def _with_template(tokenizer, template: str):
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template, suffix, end_of_turn", [
    (CHATML, "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    (LLAMA3, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    (GEMMA, "<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>"),
    (MISTRAL, " [/INST]", "</s>"),
], ids=["chatml", "llama3", "gemma", "mistral"])
def test_end_of_instruction_and_end_of_turn_are_derived(tokenizer, template, suffix, end_of_turn):
    tokenizer = _with_template(tokenizer, template)
    ids = end_of_instruction_ids(tokenizer, _model_config())
    assert tokenizer.decode(ids) == suffix
    # Those ids are exactly the last tokens of any formatted prompt (left padding: positions -len(ids) .. -1).
    for text in format_instructions(tokenizer, ["Why is the sky blue?", "x"], _model_config()):
        assert tokenizer(text, add_special_tokens=False)["input_ids"][-len(ids):] == ids
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == [end_of_turn]


def test_template_kwargs_reach_the_template_and_the_positions(tokenizer):
    tokenizer = _with_template(tokenizer, CHATML)
    config = _model_config(template_kwargs={"enable_thinking": False})
    assert format_instructions(tokenizer, ["Hi"], config)[0].endswith("assistant\n<think>\n\n</think>\n\n")
    assert tokenizer.decode(end_of_instruction_ids(tokenizer, config)).endswith("assistant\n<think>\n\n</think>\n\n")


def test_system_prompt_is_rendered_or_refused_clearly(tokenizer):
    tokenizer = _with_template(tokenizer, CHATML)
    rendered = format_instructions(tokenizer, ["Hi"], _model_config(system_prompt="Be brief."))[0]
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    tokenizer = _with_template(tokenizer, GEMMA)
    with pytest.raises(UserError, match="may not support one: leave model.system_prompt"):
        format_instructions(tokenizer, ["Hi"], _model_config(system_prompt="Be brief."))


def test_missing_template_is_a_user_error(tokenizer):
    tokenizer = _with_template(tokenizer, None)
    with pytest.raises(UserError, match="no chat template; pass one as a Jinja file with --chat-template FILE"):
        format_instructions(tokenizer, ["Hi"], _model_config())
    with pytest.raises(UserError, match="--chat-template"):
        end_of_instruction_ids(tokenizer, _model_config())


def test_refusal_tokens_are_first_tokens_with_and_without_space(tokenizer):
    ids = refusal_token_ids(tokenizer, ["I", "I'm", "As", "I cannot"])
    assert tokenizer.convert_ids_to_tokens(ids) == ["I", "ĠI", "As", "ĠAs"]
    with pytest.raises(UserError, match="refusal_openings"):
        refusal_token_ids(tokenizer, [])


def test_stop_tokens_join_generation_eos_and_end_of_turn(tokenizer):
    tokenizer = _with_template(tokenizer, LLAMA3)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # A Llama-3 style generation config that lists only EOS: the end of turn must still stop generation.
    stops = stop_token_ids(tokenizer, SimpleNamespace(eos_token_id=tokenizer.eos_token_id))
    assert stops == [tokenizer.eos_token_id, eot]
    assert stop_token_ids(tokenizer, SimpleNamespace(eos_token_id=[eot, 7])) == [eot, 7, tokenizer.eos_token_id]


def _save_checkpoint_dir(tokenizer, folder):
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folder


def test_load_tokenizer_pads_left_falls_back_to_eos_and_applies_template_file(tokenizer, tmp_path):
    from abliterate.model import load_tokenizer

    folder = _save_checkpoint_dir(_with_template(tokenizer, CHATML), tmp_path / "ckpt")
    template_file = tmp_path / "template.jinja"
    template_file.write_text(GEMMA)
    loaded = load_tokenizer(folder, _model_config(chat_template=str(template_file), trust_remote_code=False))
    assert loaded.padding_side == "left"
    assert loaded.pad_token == "</s>"
    assert loaded.chat_template == GEMMA
    with pytest.raises(UserError, match="does not exist; pass an existing Jinja file to --chat-template"):
        load_tokenizer(folder, _model_config(chat_template=str(tmp_path / "missing.jinja"), trust_remote_code=False))


def test_load_model_gives_an_eval_model_and_left_padded_tokenizer(toy_refuser_dir):
    import torch

    from abliterate.config import load_config
    from abliterate.model import load_model

    model, tokenizer = load_model(str(toy_refuser_dir), load_config().model, dtype="float32")
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|pad|>"
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(toy_refuser_dir / "nope"), load_config().model)


def test_sentencepiece_style_tokenizer_dedupes_spaced_variants_and_finds_inst_suffix():
    """Metaspace tokenizers (Llama 2, Mistral v1) give "I" and " I" the same piece; [/INST] is the suffix."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["I cannot help. As an AI I cannot. [INST] Name a fruit [/INST] Sure"] * 20,
                                trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert tokenizer.convert_ids_to_tokens(refusal_token_ids(tokenizer, ["I", "As"])) == ["▁I", "▁As"]
    tokenizer.chat_template = MISTRAL
    suffix = end_of_instruction_ids(tokenizer, _model_config())
    assert tokenizer.convert_ids_to_tokens(suffix) == ["▁[/INST]"]
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == ["</s>"]
