"""The offline API: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

from raylight.config import EngineArgs
from raylight.outputs import RequestOutput
from raylight.sampling_params import SamplingParams
from raylight.engine.llm_engine import LLMEngine, PromptType
from raylight.engine.tokenizer import apply_chat_template

Messages = list[dict[str, Any]]


class LLM:
    """An engine in this process. `LLM()` serves the default SmolLM2-135M-Instruct.

    With tensor_parallel_size x pipeline_parallel_size > 1 this process is rank 0 and the other
    ranks are child processes (spawned: guard a script's top level with `if __name__ ==
    "__main__":`). They stop on `shutdown()`, at the end of a `with LLM(...) as llm:` block, when
    the LLM is garbage collected, or when the interpreter exits."""

    def __init__(self, model: Optional[str] = None, **engine_args: Any):
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))

    def shutdown(self) -> None:
        """Stops the other ranks of a tensor/pipeline-parallel engine; nothing to do for one rank."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        cache_salt: Optional[str] = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Every prompt is validated before any is queued, so a
        bad one raises ValueError (naming its index and the problem) and leaves the engine as it was."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                 and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling_params")
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                requests.append(self.engine.make_request(prompt, params, cache_salt=cache_salt))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for req in requests:
            self.engine.enqueue(req, final_only=True)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(
        self,
        messages: Union[Messages, Sequence[Messages]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {"prompt_token_ids": apply_chat_template(self.engine.tokenizer, conv, add_generation_prompt,
                                                     **(chat_template_kwargs or {}))}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        start, out_tokens = time.monotonic(), 0
        try:
            while pending:
                for out in self.engine.step():
                    out_tokens += sum(len(c.delta_token_ids) for c in out.outputs)
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"output {out_tokens / (time.monotonic() - start):.1f} tok/s")
        except BaseException:
            self.engine.abort_request(list(pending))  # leave no blocks behind on Ctrl-C or errors
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[rid] for rid in request_ids]

    def get_metrics(self) -> dict[str, Any]:
        return self.engine.get_metrics()
