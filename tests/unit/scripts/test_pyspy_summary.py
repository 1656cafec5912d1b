"""scripts/pyspy_summary.py: py-spy raw stacks split into the engine loop's thread and the rest."""

from __future__ import annotations

from raylight.testing.helpers import load_script


def test_samples_split_into_the_engine_loop_and_the_heaviest_other_stacks(tmp_path):
    raw = tmp_path / "pyspy.txt"
    raw.write_text(
        "Thread._bootstrap (threading.py:1);AsyncLLMEngine._run (raylight/engine/async_engine.py:2);"
        "EngineLoop.run (raylight/engine/engine_loop.py:9);"
        "LLMEngine.step (raylight/engine/llm_engine.py:3) 30\n"
        "Thread.run (threading.py:4);handle (ray/serve/replica.py:5);dumps (cloudpickle.py:6) 12\n"
        "Thread.run (threading.py:4);handle (ray/serve/replica.py:5);loads (cloudpickle.py:7) 5\n"
        "a line that is not a stack\n")
    mod = load_script("pyspy_summary")
    s = mod.summarize(mod.load(str(raw)), top=1, depth=2)
    assert s["samples"] == 47
    assert s["groups"] == {"engine loop": 30, "other threads": 17}
    assert s["top_other"] == [("handle > dumps", 12)]
