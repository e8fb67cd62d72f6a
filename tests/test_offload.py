"""Models bigger than memory: accelerate offload gives the same direction and figures; the KL never holds two models.

On a CPU-only machine a `max_memory` of a few hundred kilobytes forces the toy refuser's layers to disk (accelerate
reads them back for every forward pass), which is what happens to a 400B model on a GPU node.
"""

import json
import sys
import types
import weakref
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from test_generation import build_llama

from abliterate import evaluation
from abliterate.config import load_config, parse_max_memory
from abliterate.errors import UserError
from abliterate.generation import generate_vllm
from abliterate.metrics import Scored, kl_between, kl_to_record, position_logprobs, record_logprobs
from abliterate.model import load_model

ROOT = Path(__file__).resolve().parents[1]
OFFLOAD = {"max_memory": "cpu=300KB"}  # the toy's weights are 1.2 MB: the layers cannot stay in memory

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(offload: bool, **eval_overrides):
    overrides = {"model": dict(OFFLOAD) if offload else {}, "eval": eval_overrides}
    return load_config(ROOT / "configs" / "toy.toml", overrides)


def test_small_max_memory_offloads_to_disk_with_equal_logits(toy_refuser_dir, tmp_path, caplog):
    config = load_config(ROOT / "configs" / "toy.toml", {"model": {**OFFLOAD, "offload_folder": str(tmp_path)}})
    offloaded, _ = load_model(str(toy_refuser_dir), config.model)
    plain, _ = load_model(str(toy_refuser_dir), load_config(ROOT / "configs" / "toy.toml").model)
    assert "disk" in set(offloaded.hf_device_map.values()) and not hasattr(plain, "hf_device_map")
    assert "does not fit in the memory given" in caplog.text and "to disk" in caplog.text
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_measure_with_offload_finds_the_same_direction(toy_refuser_dir, tmp_path):
    from abliterate.direction import load_direction
    from abliterate.measure import measure

    results = [measure(str(toy_refuser_dir), tmp_path / str(offload), _config(offload)) for offload in (False, True)]
    assert (results[0].layer, results[0].position) == (results[1].layer, results[1].position)
    vectors = [load_direction(result.direction_path).vector for result in results]
    assert torch.equal(vectors[0], vectors[1])
    # Weights read back from disk can take another float32 matmul path, so scores agree to rounding, not bits.
    figures = [[value for s in result.scores for value in (s.bypass, s.kl, s.induce)] for result in results]
    assert figures[1] == pytest.approx(figures[0], rel=1e-6, abs=1e-6, nan_ok=True)


def test_eval_with_offload_gives_the_same_figures_and_holds_one_model_at_a_time(toy_refuser_dir, tmp_path,
                                                                              monkeypatch):
    alive: list[weakref.ref] = []
    most_alive = []
    load = evaluation._load

    def counting_load(source, config):
        import gc

        gc.collect()
        most_alive.append(sum(ref() is not None for ref in alive))  # models still held when the next one loads
        model, tokenizer = load(source, config)
        alive.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(evaluation, "_load", counting_load)
    records = []
    for offload in (False, True):
        config = _config(offload, max_new_tokens=8)
        config.prompts.n_eval = 6
        records.append(evaluation.evaluate(str(toy_refuser_dir), config, base=str(toy_refuser_dir)).data)
    # Base, edited, then the base again for the fluency of the edited replies: never two at once.
    assert most_alive == [0, 0, 0] * 2
    plain, offloaded = (json.loads(json.dumps(record["models"])) for record in records)
    assert plain == offloaded
    assert records[0]["kl"] == records[1]["kl"] and records[0]["kl"]["first_token"] == 0.0  # base against itself


SEQUENCES = [Scored([1, 12, 13, 7, 8, 9], 1), Scored([1, 4, 14, 15, 16, 6, 5, 7, 8], 7), Scored([1, 4, 5], 3)]


def _full_kl(base, edited) -> list[torch.Tensor]:
    """KL(base || edited) per scored position from the full distributions."""
    from abliterate.activations import kl_divergence

    return [kl_divergence(p, q) for p, q in zip(position_logprobs(base, SEQUENCES, 0),
                                                 position_logprobs(edited, SEQUENCES, 0))]


def test_recorded_kl_is_exact_when_top_k_covers_the_vocabulary_and_a_lower_bound_below():
    base, edited = build_llama(seed=1), build_llama(seed=2)
    with torch.no_grad():
        full = _full_kl(base, edited)
        exact = kl_between(base, edited, SEQUENCES, pad_id=0, batch_size=2)
        coarse = kl_to_record(record_logprobs(base, SEQUENCES, 0, 2, top_k=3), edited, SEQUENCES, 0, 2)
    every = torch.cat([kl for kl, item in zip(full, SEQUENCES) if item.targets])  # [reply tokens]
    first = torch.stack([kl[0] for kl in full])  # [sequences]
    # Batched differently (padding), so equal to float32 rounding.
    assert exact["first_token"] == pytest.approx(first.mean().item(), rel=1e-5)
    assert exact["reply_tokens"] == pytest.approx(every.mean().item(), rel=1e-5)
    assert exact["max_base_mass_outside_top_k"] == 0.0
    assert coarse["max_base_mass_outside_top_k"] > 0
    assert 0 <= coarse["first_token"] < exact["first_token"]
    assert 0 <= coarse["reply_tokens"] < exact["reply_tokens"]
    assert exact["n_tokens"] == coarse["n_tokens"] == every.numel() == sum(len(item.targets) for item in SEQUENCES)


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory("") == {}
    for bad in ("20GiB", "cpu=lots", "=1GB"):
        with pytest.raises(UserError, match="--max-memory"):
            load_config(overrides={"model": {"max_memory": bad}})


class _FakeEngine:
    """Stands in for vllm.LLM: records its settings and how many engines are alive at once."""

    alive = 0
    most_alive = 0
    settings: ClassVar[list[dict]] = []

    def __init__(self, **kwargs):
        _FakeEngine.alive += 1
        _FakeEngine.most_alive = max(_FakeEngine.most_alive, _FakeEngine.alive)
        _FakeEngine.settings.append(kwargs)
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self):
        _FakeEngine.alive -= 1

    def generate(self, prompts, settings):
        reply = types.SimpleNamespace(token_ids=[7, 2], finish_reason="stop")
        return [types.SimpleNamespace(outputs=[reply]) for _ in prompts]


def test_vllm_engines_get_tensor_parallel_size_and_run_one_at_a_time(monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _FakeEngine, lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.distributed", None)  # no distributed state to tear down here
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 7, "</s>": 2}, "a")))
    for model_dir in ("base", "edited"):
        replies = generate_vllm(model_dir, tokenizer, ["a a", "a"], [2], 4, tensor_parallel_size=4)
        assert [reply.token_ids for reply in replies] == [[7], [7]] and all(reply.stopped for reply in replies)
    assert _FakeEngine.most_alive == 1 and _FakeEngine.alive == 0
    assert [settings["tensor_parallel_size"] for settings in _FakeEngine.settings] == [4, 4]
