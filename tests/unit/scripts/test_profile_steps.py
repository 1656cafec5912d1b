"""scripts/profile_steps.py on CPU (llama-tiny): with `--workload-file` it profiles a saved workload's own
requests (each with its output length), caps the mixed window at `--mixed-steps`, and says so in its
record; every request still runs to its end."""

from __future__ import annotations

import glob
import json

from raylight.testing.helpers import load_script


def test_a_saved_workload_is_profiled_with_its_own_lengths(tmp_path):
    prof = load_script("profile_steps")
    prompts = [[(7 * i + j) % 90 + 5 for j in range(8 + 9 * i)] for i in range(6)]  # 8..53 tokens
    path = tmp_path / "wl.json"
    path.write_text(json.dumps(dict(name="mix", prompts=prompts, output_lens=[3, 9, 4, 12, 5, 7])))
    prof.main(["--model-config", "llama-tiny", "--device", "cpu", "--workload-file", str(path),
               "--max-num-batched-tokens", "32", "--mixed-steps", "2", "--decode-steps", "2", "--top", "3",
               "--out", str(tmp_path)])
    (record_path,) = glob.glob(str(tmp_path / "profile-llama-tiny-*.json"))
    record = json.load(open(record_path))
    assert record["workload"]["workload_file"] == "mix" and record["workload"]["num_requests"] == 6
    assert record["workload"]["input_len"] is None
    phases = record["phases"]
    assert phases["prefill"]["steps"] == 1 and phases["mixed"]["steps"] == 2  # capped; 32-token chunks of 8-53
    assert phases["decode"]["steps"] == 2
