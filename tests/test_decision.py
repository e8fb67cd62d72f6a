"""Per-prompt decisions, on token lists: where each reply decides, the markers that tell refusals from answers,
and the continuation each prompt is scored after (abliterate.decision)."""

from abliterate.decision import Segments, cut_at_decision, decides, decision_tokens, find_markers, held_out_margin

THINK, CLOSE = 1, 2  # "<think>" and "</think>"
HARMFUL_WORD, FINE_WORD = 10, 11  # the thinking's verdict: "harmful" / "fine"
SORRY, SURE = 20, 21  # the answer: "Sorry ..." / "Sure ..."


def _reply(topic: int, verdict: int, answer: int) -> list[int]:
    """<think> the user asks about TOPIC. this is VERDICT. </think> ANSWER ..."""
    return [THINK, 5, 6, topic, 7, verdict, CLOSE, answer, 8, 9]


def test_markers_in_the_answer_after_the_thinking_and_the_continuation_up_to_them():
    # Topics differ per prompt (30..45 harmful, 50..65 harmless): none is held by half of a side's replies.
    harmful = [_reply(30 + i % 16, HARMFUL_WORD, SORRY) for i in range(32)]
    harmless = [_reply(50 + i % 16, FINE_WORD, SURE) for i in range(32)]
    answers = Segments(prefix=(THINK, 5, 6), closer=(CLOSE,))
    markers = find_markers(harmful, harmless, answers)
    # In the answer, only its own tokens count: the verdict inside the thinking is not looked at.
    assert markers.refusal == [SORRY] and markers.answer == [SURE]
    assert decision_tokens(harmful, answers, markers) == [SORRY]
    assert all(decides(reply, answers, markers) for reply in harmful)
    assert not any(decides(reply, answers, markers) for reply in harmless)
    assert held_out_margin(harmful, harmless, answers) == 1.0
    # The continuation is the reply after the shared prefix, through the thinking, up to the first marker.
    assert cut_at_decision(harmful[0], answers, markers.all) == [30, 7, HARMFUL_WORD, CLOSE]
    # From the prefix on (no thinking block), the verdict is the first marker.
    whole = Segments(prefix=(THINK, 5, 6))
    markers = find_markers(harmful, harmless, whole)
    assert HARMFUL_WORD in markers.refusal and FINE_WORD in markers.answer
    assert cut_at_decision(harmless[3], whole, markers.all) == [53, 7]


def test_a_reply_without_the_prefix_or_a_closed_thinking_block_has_no_decision():
    answers = Segments(prefix=(THINK, 5, 6), closer=(CLOSE,))
    unfinished = [THINK, 5, 6, 30, 7, HARMFUL_WORD]  # cut before </think>
    assert answers.start(unfinished) is None and cut_at_decision(unfinished, answers, {SORRY, SURE}) is None
    assert answers.start([5, 6, CLOSE, SORRY]) is None  # no shared prefix
    assert cut_at_decision(_reply(30, HARMFUL_WORD, 8), answers, {SORRY, SURE}) is None  # no marker at all


def test_sides_that_do_not_part_give_no_markers_and_no_margin():
    same = [_reply(30 + i % 4, HARMFUL_WORD, SORRY) for i in range(32)]
    answers = Segments(prefix=(THINK, 5, 6), closer=(CLOSE,))
    markers = find_markers(same, same, answers)
    assert markers.refusal == [] and markers.answer == []
    assert held_out_margin(same, same, answers) == 0.0
