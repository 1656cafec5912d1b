"""engine/output_processor: stop strings found across token boundaries, deltas that add up to the
text, text held back while it could still become a stop string, and a stop string that the
scheduler ends the sequence for."""

from __future__ import annotations

from raylight.engine.kv_cache import KVCacheManager
from raylight.engine.output_processor import OutputProcessor, find_stop_string
from raylight.engine.request import Request
from raylight.engine.scheduler import Scheduler
from raylight.sampling_params import SamplingParams
from raylight.workers.model_runner import SampledToken


class CharTokenizer:
    """Token t decodes to chr(t): enough for the slow-tokenizer path of the detokenizer."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(t) for t in ids)


def test_find_stop_string_spans_tokens_and_picks_the_earliest():
    assert find_stop_string("hello wor", 3, ["wor"]) == ("wor", 6)
    assert find_stop_string("abcXYdef", 3, ["def", "XYd"]) == ("XYd", 3)
    assert find_stop_string("abc", 1, ["ab"]) is None  # completed before the newest text: not new


def test_deltas_hold_back_then_stop():
    sched = Scheduler(KVCacheManager(8, 4), 64, 4, 64)
    done = []
    out = OutputProcessor(CharTokenizer(), sched, done.append)
    req = Request("r", [1, 2], SamplingParams(stop=["END"], max_tokens=20), 20)
    out.add(req)
    sched.add_request(req)
    step = sched.schedule()
    assert step.request_ids == ["r"]
    texts = []
    for ch in "okEN":
        req.append_output_token(ord(ch))
        [o] = out.process([(req, SampledToken(ord(ch)))])
        texts.append(o.outputs[0].delta_text)
        assert not o.finished
    assert "".join(texts) == "ok"  # "EN" could still start "END": held back
    req.append_output_token(ord("D"))
    [o] = out.process([(req, SampledToken(ord("D")))])
    c = o.outputs[0]
    assert o.finished and c.text == "ok" and c.finish_reason == "stop" and c.stop_reason == "END"
    assert c.delta_text == "" and req.is_finished and "r" not in sched.requests  # the scheduler freed it
    assert done == ["r", "r"]  # finished, then dropped: the runner frees its sampling state
    assert "r" not in out


def test_paced_streams_get_every_token_in_fewer_outputs(monkeypatch):
    """min_interval_s (a replica's stream pacing): the first output goes at once, then none until the
    interval has passed, and each carries every token since; a finished request's output is never held."""
    import raylight.engine.output_processor as op

    clock = [100.0]
    monkeypatch.setattr(op.time, "monotonic", lambda: clock[0])
    sched = Scheduler(KVCacheManager(8, 4), 64, 4, 64)
    out = OutputProcessor(CharTokenizer(), sched, lambda sid: None)
    out.min_interval_s = 1.0
    req = Request("r", [1, 2], SamplingParams(max_tokens=12), 12)
    out.add(req)
    sched.add_request(req)
    sched.schedule()
    got = []
    for i, ch in enumerate("abcdefghijkl"):
        clock[0] += 0.25
        req.append_output_token(ord(ch))
        if i == 11:
            sched.finish(req, req.check_stop(64))
        got += out.process([(req, SampledToken(ord(ch)))])
    assert got[0].outputs[0].delta_text == "a"  # the first token: at once
    assert 3 <= len(got) <= 7 and got[-1].finished  # 12 tokens, 0.25 s apart, an output every 0.5-1.5 s
    assert "".join(o.outputs[0].delta_text for o in got) == "abcdefghijkl"
    assert [t for o in got for t in o.outputs[0].delta_token_ids] == [ord(c) for c in "abcdefghijkl"]
    out.min_interval_s = 0.0  # the budget lifted: every token again
    req2 = Request("q", [1, 2], SamplingParams(max_tokens=5), 5)
    out.add(req2)
    sched.add_request(req2)
    sched.schedule()
    for ch in "vwx":
        req2.append_output_token(ord(ch))
        assert len(out.process([(req2, SampledToken(ord(ch)))])) == 1
