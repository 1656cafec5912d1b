"""outputs.merge_outputs: two consecutive outputs of a request as one, deltas joined per sequence."""

from raylight.outputs import CompletionOutput, Logprob, RequestOutput, merge_outputs


def out(step: int, texts: list[str], finished=False, logprobs=False) -> RequestOutput:
    comps = []
    for i, t in enumerate(texts):
        lps = [{100 + step: Logprob(-0.5)}] if logprobs else None
        comps.append(CompletionOutput(i, "x" * step + t, list(range(step + 1)), "stop" if finished else None,
                                      delta_text=t, delta_token_ids=[step], delta_logprobs=lps))
    return RequestOutput("r", None, [1, 2], comps, finished)


def test_deltas_join_per_sequence_and_the_rest_is_the_newer():
    a, b, c = out(0, ["A", "a"]), out(1, ["B", ""]), out(2, ["C", "c"], finished=True)
    m = merge_outputs(merge_outputs(a, b), c)
    assert m is c and m.finished and m.outputs[0].finish_reason == "stop"
    assert [x.delta_text for x in m.outputs] == ["ABC", "ac"]
    assert [x.delta_token_ids for x in m.outputs] == [[0, 1, 2], [0, 1, 2]]
    assert m.outputs[0].token_ids == [0, 1, 2] and m.outputs[0].delta_logprobs is None


def test_logprobs_join_and_a_sequence_missing_before_keeps_its_own():
    a, b = out(0, ["A"], logprobs=True), out(1, ["B", "b"], logprobs=True)
    m = merge_outputs(a, b)
    assert [list(lp) for lp in m.outputs[0].delta_logprobs] == [[100], [101]]
    assert [list(lp) for lp in m.outputs[1].delta_logprobs] == [[101]] and m.outputs[1].delta_text == "b"
