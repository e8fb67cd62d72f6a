"""Generation stops at the chat template's end-of-turn token, batches with left padding, and saves completions.

The "successor" model below is crafted so its greedy output is known in advance: the residual stream is the
one-hot embedding of the current token (attention and MLP outputs are zeroed) and the unembedding maps each token
to a fixed next token. After the generation prompt it says "a b <|eot|> c d d d ...", so a generator that only
stops at EOS runs past the end of turn (the paper's Llama 3 bug) and one that stops at the real stop tokens
returns "a b". Other eval test files import the builders from here.
"""

from pathlib import Path

import pytest
import torch

from abliterate.errors import UserError
from abliterate.generation import (
    Completion,
    cut_at_stop,
    generate_transformers,
    generate_vllm,
    load_completions,
    save_completions,
)

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|eot|>",
         "a", "b", "c", "d", "e", "hello", "world", "how", "are", "you", "tell", "me", "bomb", "cake", "sorry",
         "safe", "unsafe"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} <|eot|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOS_ID, EOT_ID = 2, 6


def build_tokenizer():
    """A word-level tokenizer with BOS/EOS, an end-of-turn token and a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|eot|>"],
    )
    tokenizer.chat_template = TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_llama(seed: int = 0, dtype: torch.dtype = torch.float32, n_layers: int = 2):
    """A tiny random Llama over WORDS (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


DEFAULT_CHAIN = {"<|assistant|>": "a", "a": "b", "b": "<|eot|>", "<|eot|>": "c", "c": "d"}


def build_successor_model(successor: dict[str, str] | None = None):
    """A Llama whose greedy next token is `successor[current token]` ("d" when absent).

    With the default chain, the continuation of "<|assistant|>" is "a b <|eot|> c d d d ..." (module docstring).
    """
    model = build_llama(n_layers=1)
    index = {w: i for i, w in enumerate(WORDS)}
    successor = successor or DEFAULT_CHAIN
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, : len(WORDS)] = torch.eye(len(WORDS))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for word, token in index.items():
            model.lm_head.weight[index[successor.get(word, "d")], token] = 10.0
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def chat(tokenizer, instruction: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True)


def test_cut_at_stop():
    assert cut_at_stop([7, 8, 6, 9], [2, 6]) == ([7, 8], True)
    assert cut_at_stop([7, 8, 9], [2, 6]) == ([7, 8, 9], False)


def test_generation_stops_at_end_of_turn(tokenizer):
    model = build_successor_model()
    texts = [chat(tokenizer, "hello world"), chat(tokenizer, "how are you")]
    replies = generate_transformers(model, tokenizer, texts, [EOS_ID, EOT_ID], max_new_tokens=8, batch_size=2)
    assert [r.text for r in replies] == ["a b", "a b"]
    assert [r.token_ids for r in replies] == [[7, 8], [7, 8]]
    assert all(r.stopped for r in replies)


def test_generation_with_eos_only_runs_past_end_of_turn(tokenizer):
    # The paper's bug, reproduced on purpose: without the end-of-turn token the reply runs on to max_new_tokens.
    model = build_successor_model()
    [reply] = generate_transformers(model, tokenizer, [chat(tokenizer, "hello")], [EOS_ID], max_new_tokens=6, batch_size=1)
    assert reply.text == "a b c d d"
    assert not reply.stopped and len(reply.token_ids) == 6


def test_left_padded_batches_match_single_prompts(tokenizer):
    model = build_llama(seed=3, dtype=torch.float64)
    texts = [chat(tokenizer, words) for words in ["hello", "tell me how are you a b c", "cake", "bomb bomb e"]]
    batched = generate_transformers(model, tokenizer, texts, [EOS_ID, EOT_ID], max_new_tokens=10, batch_size=4)
    single = generate_transformers(model, tokenizer, texts, [EOS_ID, EOT_ID], max_new_tokens=10, batch_size=1)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert any(len(r.token_ids) > 0 for r in batched)


def test_completions_round_trip(tmp_path: Path):
    completions = [Completion("tell me", "cyber", "I'm sorry", 3, True), Completion("ünïcode", "", "", 0, False)]
    path = save_completions(tmp_path / "out" / "completions.jsonl", completions)
    assert load_completions(path) == completions
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert not list(path.parent.glob(".*.tmp"))


def test_vllm_missing_is_a_user_error(tokenizer):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"--backend vllm needs vLLM .*--backend transformers"):
            generate_vllm("unused", tokenizer, ["x"], [EOS_ID], 4)
    else:
        pytest.skip("vLLM is installed here")


def test_stop_ids_derived_from_the_template_stop_generation(tokenizer):
    # The derivation: generation config EOS plus the end-of-turn token read from a rendered assistant turn.
    from abliterate.chat import stop_token_ids

    model = build_successor_model()
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    assert set(stop_ids) == {EOS_ID, EOT_ID}
    [reply] = generate_transformers(model, tokenizer, [chat(tokenizer, "hello")], stop_ids, max_new_tokens=8, batch_size=1)
    assert (reply.text, reply.stopped) == ("a b", True)
