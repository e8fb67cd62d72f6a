"""The refusal/compliance judge against a loopback server speaking Together's chat-completions wire format.

The server reads the response out of the classification prompt and labels it: "I cannot..." is a refusal,
"Sure..." compliance, "zzz" a non-answer, "weird" gets an answer that is no label, and "busy" is answered 429 once
(with Retry-After-Ms, which the SDK honours) before it succeeds. It records every request, so the tests see the
labels, the retry, and that a second run is served from the cache.
"""

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from abliterate.config import load_config
from abliterate.errors import UserError
from abliterate.judge import KEY_VARIABLE
from abliterate.refusal_judge import check_refusal_judge, classify_replies, label_counts, parse_label

FAKE_KEY = "test-key-not-a-secret"


class LabelServer(BaseHTTPRequestHandler):
    requests: ClassVar[Counter] = Counter()
    models: ClassVar[list] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        reply = re.search(r"\[RESPONSE\]\n(.*)\n\[/RESPONSE\]", text, flags=re.DOTALL).group(1)
        LabelServer.requests[reply] += 1
        LabelServer.models.append(body["model"])
        if reply == "busy" and LabelServer.requests[reply] == 1:
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After-Ms": "10"})
        label = ("Refusal." if reply.startswith("I cannot") else "compliance" if reply.startswith(("Sure", "busy"))
                 else "I am not sure" if reply == "weird" else "Non-answer")
        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": label}}]})


@pytest.fixture(scope="module")
def label_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), LabelServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def judge_env(label_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TOGETHER_BASE_URL", label_server)
    monkeypatch.setenv(KEY_VARIABLE, FAKE_KEY)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    LabelServer.requests.clear()
    LabelServer.models.clear()
    return load_config(overrides={"eval": {"refusal_judge": "together:some/grader", "judge": "none"}})


def test_parse_label():
    assert parse_label("Refusal.") == "refusal" and parse_label(" compliance\n") == "compliance"
    assert parse_label("Non-answer") == "non-answer" and parse_label("non answer") == "non-answer"
    assert parse_label("I think it complies") is None and parse_label("") is None


def test_labels_retry_cache_and_counts(judge_env):
    pairs = [("p1", "I cannot help with that."), ("p2", "Sure, step one."), ("p3", "zzz"), ("p4", "busy"),
             ("p5", ""), ("p6", "weird")]
    labels = classify_replies(pairs, judge_env.eval)
    assert labels == ["refusal", "compliance", "non-answer", "compliance", "non-answer", None]
    assert LabelServer.requests["busy"] == 2  # one 429, one retry by the SDK
    assert LabelServer.requests[""] == 0  # an empty reply is a non-answer without asking
    assert set(LabelServer.models) == {"some/grader"}
    counts = label_counts(labels)
    assert (counts["refusal"]["count"], counts["compliance"]["count"], counts["non_answer"]["count"]) == (1, 2, 2)
    assert counts["refusal"]["n"] == 5 and counts["n_errors"] == 1

    LabelServer.requests.clear()
    again = classify_replies(pairs, judge_env.eval)
    assert again == labels
    assert sum(LabelServer.requests.values()) == 1 and LabelServer.requests["weird"] == 1  # only the error is re-asked


def test_refusal_judge_needs_a_key_and_a_valid_spec(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with pytest.raises(UserError, match=KEY_VARIABLE):
        check_refusal_judge(load_config(overrides={"eval": {"refusal_judge": "together:m"}}).eval)
    with pytest.raises(UserError, match="not a model directory"):
        check_refusal_judge(load_config(overrides={"eval": {"refusal_judge": f"local:{tmp_path}"}}).eval)
    with pytest.raises(UserError, match="--refusal-judge"):
        load_config(overrides={"eval": {"refusal_judge": "gpt"}})


def test_local_refusal_judge_reads_its_model_and_counts_a_non_label_as_an_error(tmp_path, monkeypatch):
    from test_generation import build_successor_model, build_tokenizer

    # A local "grader" whose greedy answer after its generation prompt is "sorry": no label, so a judge error.
    grader = tmp_path / "grader"
    build_successor_model({"<|assistant|>": "sorry", "sorry": "</s>"}).save_pretrained(grader)
    build_tokenizer().save_pretrained(grader)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    config = load_config(overrides={"eval": {"refusal_judge": f"local:{grader}", "judge": "none"}})
    assert classify_replies([("tell me", "a b c"), ("bomb", "  ")], config.eval) == [None, "non-answer"]
