"""How an engine's steps overlap with each other and with the host's work: one small policy
object that the one step loop (engine/llm_engine.py `LLMEngine.step`) consults.

Four shapes, all the same loop:

* plain: launch a step, wait for its tokens, turn them into outputs;
* overlapped host work (`overlap_host_work`): a step's tokens become outputs while the device
  runs the next step;
* async scheduling: the next step is scheduled and launched before this one's tokens are known,
  on placeholder tokens the device fills in: one step stays in flight;
* micro-batches (`num_microbatches`, pipeline parallelism): up to N steps in flight over
  disjoint sets of requests, so every pipeline stage (or the host and the device) has work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylight.config import EngineArgs


@dataclass(frozen=True)
class OverlapPolicy:
    max_in_flight: int = 0  # steps left launched but not collected when `step()` returns
    run_ahead: bool = False  # schedule on the tokens a step in flight will sample (async scheduling)
    disjoint: bool = False  # steps in flight hold disjoint requests (micro-batches)
    defer_outputs: bool = False  # a step's tokens become outputs during the next step
    defer_compute: bool = False  # this rank's compute runs at collect time (the last PP stage)

    @property
    def name(self) -> str:
        if self.run_ahead:
            return "async-scheduling"
        if self.disjoint:
            return f"micro-batches({self.max_in_flight + 1})"
        return "overlap-host-work" if self.defer_outputs else "plain"

    @staticmethod
    def from_args(args: EngineArgs, device: torch.device) -> "OverlapPolicy":
        microbatches = args.num_microbatches or args.pipeline_parallel_size
        # The first PP stage would need the ids the last one samples: no async scheduling under PP.
        possible = args.pipeline_parallel_size == 1 and microbatches == 1
        if args.async_scheduling and not possible:
            raise ValueError("async_scheduling needs pipeline_parallel_size = num_microbatches = 1")
        on_cuda = device.type == "cuda"
        if possible and (args.async_scheduling if args.async_scheduling is not None else on_cuda):
            return OverlapPolicy(max_in_flight=1, run_ahead=True)
        if microbatches > 1:
            # Under PP we are the last stage: computing a step waits on the previous stage, so our
            # share runs when the step is collected, after the next micro-batch went down the pipeline.
            return OverlapPolicy(max_in_flight=microbatches - 1, disjoint=True,
                                 defer_compute=args.pipeline_parallel_size > 1)
        # On CPU nothing runs concurrently with the host: building outputs early gains nothing.
        defer = args.overlap_host_work if args.overlap_host_work is not None else on_cuda
        return OverlapPolicy(defer_outputs=defer)
