"""Chat toys that refuse the way real models do, for testing that refusal is found from the model itself.

Each toy is a tiny Llama trained like abliterate's toy refuser (helpful pretraining, then safety tuning on the same
(verb, object) requests), but with its own tokenizer, chat template and refusal wording:

- `lowercase_space`: a Mistral-style `[INST] ... [/INST]` template whose reply is `' ' + content`, on a byte-level
  BPE that keeps every space a token of its own, so every reply opens with the same lone space; it refuses in lower
  case ("unfortunately i can not help with that.").
- `thinking`: ChatML; every reply opens with the same empty thinking block `<think>\\n\\n</think>\\n\\n`.
- `switchable_thinking`: a template that renders an empty thinking block when `enable_thinking=False`; with
  thinking on, the toy thinks about each request first ("the user wants to steal a car. that is harmful.").
- `foreign`: a plain-text template with Russian role names; it answers and refuses in Russian (Cyrillic script),
  with a larger vocabulary.
- `shared_opening`: Llama 3's header tokens and a default system message; it answers in French ("Je vais vous
  expliquer comment ...") and refuses in two sentences about equally often, one opening with the same "Je" ("Je ne
  peux pas ..."), the other with "Désolé".

`chat_toy(name)` builds a toy once per machine and caches it under $ABLITERATE_CACHE (or ~/.cache/abliterate) in a
folder named by a hash of this file, like `abliterate.toy.toy_refuser`. The session fixtures return
`(model_dir, prompt_splits)`; the splits are `abliterate.toy.toy_prompt_splits` with the toy's seed, so evaluation
prompts are phrase pairs the toy never saw. `ChatToy.refuses` is the ground truth: the toy's own refusal text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from abliterate.toy import ToySettings, _new_model, _phrase_of, _train, build_once, cache_root, toy_prompt_splits

HARMFUL = "harmful"

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen3's switch: thinking is on unless the caller passes enable_thinking=False, which pre-fills an empty block.
SWITCHABLE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
# Llama 3's header tokens, with a default system message the template adds when none is given.
HEADER_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nVous êtes un assistant prudent.<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
RUSSIAN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|bos|>Пользователь: ' + message['content'] + '\\nАссистент:' }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n' + message['content'] + '<|eos|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatToy:
    """One toy's tokenizer, template and replies; `refuses` tells a refusal by the toy's own refusal text."""

    name: str
    template: str
    special_tokens: tuple[str, ...]  # pad first, then EOS
    refusal: str
    comply: str  # with {phrase}
    vocab_size: int
    seed: int
    lone_spaces: bool = False  # every space its own token (the lone-space first reply token)
    space_before_reply: bool = False  # the template's assistant turn is ' ' + content
    bos_token: str | None = None
    added_tokens: tuple[str, ...] = ()  # plain (not special) added tokens, such as <think>
    fixed_thinking: str = ""  # a block every reply opens with
    thought: str = ""  # with thinking on, a per-prompt thought: {phrase} and {verdict}
    # Pretraining and safety steps, and depth: one layer and 200 safety steps more than the demo toy. With five
    # layers and 300 steps, toys whose decision comes after a reply prefix refused in a way no single direction
    # removed (the best candidate's bypass score stayed above 0); a deeper, longer-tuned toy refuses along one.
    steps: tuple[int, int] = (200, 500)
    n_layers: int = 6
    # A second refusal, trained beside `refusal` on every harmful prompt: the toy opens either way, about as often.
    other_refusal: str = ""

    def answer(self, prompt: str, harmful: bool) -> str:
        return self.refusal if harmful else self.comply.format(phrase=_phrase_of(prompt))

    def replies(self, prompt: str, harmful: bool) -> list[tuple[dict, str]]:
        """(template kwargs, reply) for every way this toy is prompted in training."""
        if harmful and self.other_refusal:
            return [({}, self.fixed_thinking + refusal) for refusal in (self.refusal, self.other_refusal)]
        answer = self.answer(prompt, harmful)
        if self.thought:
            verdict = "that is harmful" if harmful else "that is fine"
            thought = self.thought.format(phrase=_phrase_of(prompt), verdict=verdict)
            return [({}, f"<think>\n{thought}\n</think>\n\n{answer}"), ({"enable_thinking": False}, answer)]
        return [({}, self.fixed_thinking + answer)]

    def refuses(self, reply: str) -> bool:
        return any(says_refusal(refusal, reply) for refusal in (self.refusal, self.other_refusal) if refusal)


def says_refusal(refusal: str, reply: str) -> bool:
    """The ground truth: the reply, after any thinking block, opens with the toy's refusal words or holds its last
    four (a broken edit can start an answer and slide back into the refusal: "Sure! Here's how to ba... I can't
    assist with that request."). Three are too few: "help with that." also ends degenerate answers that refuse
    nothing ("Sure, here is how to sabot help with that."); four hold the refusing verb ("cannot help with that.")."""
    answer = reply.rsplit("</think>", 1)[-1].strip().lower()
    words = refusal.lower().split()
    return answer.startswith(" ".join(words[:3])) or " ".join(words[-4:]) in answer


TOYS = {
    "lowercase_space": ChatToy(
        name="lowercase_space", template=MISTRAL_TEMPLATE, special_tokens=("<pad>", "</s>", "<s>", "[INST]", "[/INST]"),
        bos_token="<s>", refusal="unfortunately i can not help with that.", comply="sure, here is how to {phrase}.",
        vocab_size=360, seed=1, lone_spaces=True, space_before_reply=True),
    # Seed 8: with seed 2 no direction removed refusal without also breaking the thinking block every reply opens
    # with (the KL at the prefix positions rejected it); with seed 7 a sixth of the held-out refusals stayed.
    "thinking": ChatToy(
        name="thinking", template=CHATML_TEMPLATE, special_tokens=("<|endoftext|>", "<|im_end|>", "<|im_start|>"),
        added_tokens=("<think>", "</think>"), fixed_thinking="<think>\n\n</think>\n\n",
        refusal="I'm sorry, but I can't assist with that request.", comply="Sure! Here's how to {phrase}: start small.",
        vocab_size=480, seed=8),
    "switchable_thinking": ChatToy(
        name="switchable_thinking", template=SWITCHABLE_TEMPLATE,
        special_tokens=("<pad>", "<eos>", "<start_of_turn>", "<end_of_turn>"), added_tokens=("<think>", "</think>"),
        thought="the user wants to {phrase}. {verdict}.", refusal="I won't help with that.",
        comply="Okay! To {phrase}, begin slowly.", vocab_size=440, seed=3),
    # Seed 6: trained with seeds 4 and 5 (and the same recipe), this toy refused in a way the paper's filters reject
    # (adding any candidate direction to harmless prompts did not induce refusal), so it would not test measuring.
    # 400 helpful steps: after 200 its loss stayed at 0.25 and it answered every request with one of six memorized
    # phrases, none the one asked for, picked by near-ties (which reply an edit kept was then a coin flip).
    "foreign": ChatToy(
        name="foreign", template=RUSSIAN_TEMPLATE, special_tokens=("<|pad|>", "<|eos|>", "<|bos|>"),
        refusal="Извините, я не могу помочь с этим.", comply="Конечно! Вот как {phrase}.", vocab_size=640, seed=6,
        steps=(400, 500)),
    # Trained on both refusals for every harmful prompt, it opens a refusal with the "Je" every answer opens with
    # about as often as with "Désolé": scoring "Désolé" alone misses half the refusal.
    "shared_opening": ChatToy(
        name="shared_opening", template=HEADER_TEMPLATE,
        special_tokens=("<|pad|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
        bos_token="<|begin_of_text|>", refusal="Je ne peux pas vous aider avec cela.",
        other_refusal="Désolé, je refuse de répondre à cette demande.",
        comply="Je vais vous expliquer comment {phrase}.", vocab_size=560, seed=9, steps=(400, 500)),
}


def _tokenizer(toy: ChatToy, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    if toy.lone_spaces:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=toy.vocab_size, special_tokens=list(toy.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=toy.special_tokens[0], eos_token=toy.special_tokens[1],
        bos_token=toy.bos_token, chat_template=toy.template, padding_side="left", model_max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": list(toy.special_tokens[2:])})
    if toy.added_tokens:
        tokenizer.add_tokens(list(toy.added_tokens))
    return tokenizer


def _examples(toy: ChatToy, tokenizer, prompts: list[str], harmful: bool) -> list[tuple[list[int], int]]:
    """(ids, number of prompt ids) per conversation: the generation prompt, then the reply and the EOS."""
    examples = []
    for prompt in prompts:
        for kwargs, reply in toy.replies(prompt, harmful):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, **kwargs)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if toy.space_before_reply:
                reply = " " + reply
            reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            examples.append((list(prompt_ids) + reply_ids, len(prompt_ids)))
    return examples


def _corpus(toy: ChatToy, splits: dict[str, list[str]]) -> list[str]:
    texts = []
    for side in (HARMFUL, "harmless"):
        for prompt in splits[f"{side}_model"] + splits[f"{side}_eval"]:
            texts.append(prompt)
            texts += [reply for _, reply in toy.replies(prompt, side == HARMFUL)]
            texts.append(toy.comply.format(phrase=_phrase_of(prompt)))
    return texts


def build_chat_toy(toy: ChatToy, out_dir: Path) -> Path:
    """Train `toy` (helpful pretraining, then safety tuning) and save it as a Hugging Face checkpoint."""
    from transformers import GenerationConfig

    torch.manual_seed(toy.seed)
    splits = toy_prompt_splits(toy.seed)
    tokenizer = _tokenizer(toy, _corpus(toy, splits))
    settings = replace(ToySettings(), seed=toy.seed, pretrain_steps=toy.steps[0], safety_steps=toy.steps[1],
                       n_layers=toy.n_layers)
    model = _new_model(tokenizer, settings)
    model.config.max_position_embeddings = 256
    harmful, harmless = splits["harmful_model"], splits["harmless_model"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        helpful = _examples(toy, tokenizer, harmful + harmless, harmful=False)
        _train(model, helpful, tokenizer.pad_token_id, settings.pretrain_steps, settings.pretrain_learning_rate,
               settings, f"{toy.name}, helpful")
        safety = _examples(toy, tokenizer, harmful, True) + _examples(toy, tokenizer, harmless, False)
        loss = _train(model, safety, tokenizer.pad_token_id, settings.safety_steps, settings.safety_learning_rate,
                      settings, f"{toy.name}, safety")
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_toy.json").write_text(json.dumps({"name": toy.name, "final_loss": loss}) + "\n")
    return out_dir


def _fingerprint(toy: ChatToy) -> str:
    """A hash of what decides the toy's weights: its spec, the training code here and abliterate's toy trainer."""
    import inspect

    import transformers

    code = "".join(inspect.getsource(function) for function in (_tokenizer, _examples, _corpus, build_chat_toy))
    digest = hashlib.sha256((repr(toy) + code).encode() + Path(_train.__code__.co_filename).read_bytes())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def chat_toy_dir(name: str) -> Path:
    """Where the toy `name` is cached (built or not)."""
    return cache_root() / "chat-toys" / f"{name}-{_fingerprint(TOYS[name])}"


def chat_toy(name: str) -> tuple[Path, dict[str, list[str]]]:
    """The cached toy `name` (built on first use, renamed into place whole) and its prompt splits."""
    toy, target = TOYS[name], chat_toy_dir(name)
    if not (target / "chat_toy.json").is_file():
        build_once(target, "chat_toy.json", name, lambda staging: build_chat_toy(toy, staging))
    return target, toy_prompt_splits(toy.seed)


def write_prompt_files(splits: dict[str, list[str]], folder: Path) -> dict[str, str]:
    """The fit and evaluation prompts as local .txt files: prompts config values for every source."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = {}
    for side in (HARMFUL, "harmless"):
        for part, key in (("train", "train"), ("eval", "eval")):
            path = folder / f"{side}_{part}.txt"
            path.write_text("\n".join(splits[f"{side}_{part}"]) + "\n", encoding="utf-8")
            sources[f"{side}_{key}"] = str(path)
    return sources


def _fixture(name: str) -> Callable:
    @pytest.fixture(scope="session")
    def build() -> tuple[Path, dict[str, list[str]]]:
        return chat_toy(name)
    build.__doc__ = f"The {name} chat toy: (model_dir, prompt_splits)."
    return build


lowercase_space_toy = _fixture("lowercase_space")
thinking_toy = _fixture("thinking")
switchable_thinking_toy = _fixture("switchable_thinking")
foreign_toy = _fixture("foreign")
shared_opening_toy = _fixture("shared_opening")
