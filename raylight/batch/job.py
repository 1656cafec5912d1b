"""The batch job: `torchrun --nproc-per-node N -m raylight.batch -i requests.jsonl -o results.jsonl`.

Ranks and engines. torchrun starts N ranks per node (RANK, WORLD_SIZE, LOCAL_RANK in their environment);
`python -m raylight.batch ...` alone is a world of one. With G = tensor_parallel_size x
pipeline_parallel_size, the world splits into WORLD_SIZE / G groups of G consecutive ranks; the first rank
of each group drives one engine (`raylight.LLM`) over the group's G devices, and the group's other ranks
only take part in the start and leave (our engine starts its own rank processes, one per device, and
cannot adopt processes it did not start). On CUDA the leader first narrows CUDA_VISIBLE_DEVICES to its
group's devices (local ranks LOCAL_RANK .. LOCAL_RANK + G - 1, so G = 1 is the GPU of LOCAL_RANK) and the
engine's rank r takes the r-th of them; on a machine without CUDA every engine runs on the CPU.

Work. Every rank reads the input and the results already written (the output file and the part files of an
interrupted run) and takes, of the lines not yet done, those whose index modulo the number of engines is its
engine's. Lines are fed to the engine as they fit (a window of lines in flight), and each result row is
appended to the leader's own part file as soon as it is complete. When every rank is done, rank 0 merges
the rows into the output in the input's order (raylight/batch/lines.py).

Coordination goes through torchrun's key-value store (the one `init_process_group("env://")` would use), under
a prefix of our own: a barrier after every rank has read what is done (so none reads a part file that
another is already writing), the count of rows written (rank 0 turns it into the progress bar) and each
rank's "finished". No default process group is created: an engine with tensor_parallel_size > 1 creates one
for its own ranks in the leader's process.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from raylight.batch.lines import BatchItem, PartWriter, done_keys, merge, part_path, read_input
from raylight.batch.responses import api_error_row, line_error_row, ok_row, prepare
from raylight.cluster.cli import add_engine_args, engine_args_from
from raylight.cluster.protocol import APIError, param_of

logger = logging.getLogger("raylight.batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raylight.batch",
        description="Run an OpenAI batch file (one request per line: custom_id, method, url, body) through raylight "
                    "engines; under torchrun each rank (or group of tensor_parallel_size ranks) runs its own engine "
                    "on its share of the lines. Rerunning with the same output completes what is missing.")
    p.add_argument("-i", "--input-file", required=True, help="requests, one JSON object per line")
    p.add_argument("-o", "--output-file", required=True, help="results, one JSON object per line (input order)")
    p.add_argument("--served-model-name", default=None, help="the `model` of the response bodies")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens of requests that give none")
    p.add_argument("--max-lines-in-flight", type=int, default=None,
                   help="lines handed to an engine at once (default: 4 x max_num_seqs, at least 64)")
    p.add_argument("--progress-interval-s", type=float, default=2.0, help="how often ranks report progress")
    p.add_argument("--store-timeout-s", type=float, default=1800.0,
                   help="longest wait on torchrun's store (ranks reading the input, connecting)")
    p.add_argument("--log-level", default=None, help="default: INFO on rank 0, WARNING on the others")
    add_engine_args(p)
    return p


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    store: Any = None  # a c10d Store under our prefix; None for a world of one
    rows: int = 0  # the count of rows written, for a world of one

    def barrier(self, name: str) -> None:
        if self.store is None:
            return
        self.store.set(f"{name}/{self.rank}", "1")
        self.store.wait([f"{name}/{r}" for r in range(self.world_size)])

    def add_done(self, n: int) -> int:
        """Adds n rows to the shared count; returns the count."""
        if self.store is None:
            self.rows += n
            return self.rows
        return self.store.add("rows", n)

    def finish(self) -> None:
        if self.store is not None:
            self.store.set(f"finished/{self.rank}", "1")

    def all_finished(self) -> bool:
        return self.store is None or self.store.check([f"finished/{r}" for r in range(self.world_size)])


def world_from_env(timeout_s: float) -> World:
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return World()
    import torch.distributed as dist

    store, rank, world_size = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    prefix = f"raylight.batch/{env.get('TORCHELASTIC_RUN_ID', 'run')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return World(rank, world_size, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world_size)),
                 dist.PrefixStore(prefix, store))


def choose_device(requested: Optional[str], world: World, group: int) -> str:
    """The engine's device. Unless told "cpu", the leader first narrows CUDA_VISIBLE_DEVICES to its group's
    devices (before CUDA starts in this process), so the engine's rank r uses the group's r-th GPU."""
    if requested == "cpu":
        return "cpu"
    if world.world_size > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(world.local_world_size)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[world.local_rank:world.local_rank + group])
    if requested not in (None, "auto"):
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Progress:
    """Rows written by this rank, reported to the shared count every interval; rank 0 shows the count over
    all ranks (tqdm)."""

    def __init__(self, world: World, total: int, interval_s: float):
        self.world, self.interval_s = world, interval_s
        self.unsent, self.last = 0, time.monotonic()
        self.bar = None
        if world.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="Batch lines", unit="line", dynamic_ncols=True)

    def wrote(self, n: int = 1) -> None:
        self.unsent += n
        self.tick()

    def tick(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.interval_s:
            return
        self.last = time.monotonic()
        count = self.world.add_done(self.unsent)
        self.unsent = 0
        if self.bar is not None and count > self.bar.n:
            self.bar.update(count - self.bar.n)

    def close(self) -> None:
        self.tick(force=True)
        if self.bar is not None:
            self.bar.close()


def run_lines(llm, items: list[BatchItem], writer: PartWriter, progress: Progress, model_name: str,
              default_max_tokens: int, window: int) -> None:
    """Runs `items` through the engine, appending each line's row as soon as it is complete."""
    engine = llm.engine
    tokenizer, max_model_len = engine.tokenizer, engine.max_model_len
    queue = collections.deque(items)
    owner: dict[str, tuple[list, int]] = {}  # engine request id -> (line state, prompt index)
    active = 0

    def write(row: dict[str, Any]) -> None:
        writer.write(row)
        progress.wrote()

    while queue or active:
        while queue and active < window:
            item = queue.popleft()
            if item.error is not None:
                write(line_error_row(item))
                continue
            try:
                prep = prepare(item, tokenizer, max_model_len, default_max_tokens)
            except APIError as e:
                write(api_error_row(item, e))
                continue
            try:
                reqs = [engine.make_request(ids, prep.params, request_id=f"line{item.line}-{j}")
                        for j, ids in enumerate(prep.prompts)]
            except ValueError as e:  # what the engine refuses (vocabulary, KV cache too small, ...)
                write(api_error_row(item, APIError(400, str(e), param=param_of(str(e))), prep.request_id))
                continue
            state = [prep, [None] * len(reqs), len(reqs)]
            for j, req in enumerate(reqs):
                owner[req.request_id] = (state, j)
                engine.enqueue(req, final_only=True)
            active += 1
        if not active:
            continue
        for out in engine.step():
            if not out.finished or out.request_id not in owner:
                continue
            state, j = owner.pop(out.request_id)
            state[1][j] = out
            state[2] -= 1
            if state[2] == 0:
                active -= 1
                write(ok_row(state[0], state[1], model_name, tokenizer))
        progress.tick()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    world = world_from_env(ns.store_timeout_s)
    level = ns.log_level or ("INFO" if world.rank == 0 else "WARNING")
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s rank{world.rank} %(name)s: %(message)s")
    engine_args = engine_args_from(ns)
    group = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
    if world.world_size % group or world.local_world_size % group:
        print(f"error: tensor_parallel_size x pipeline_parallel_size = {group} must divide the ranks per node "
              f"({world.local_world_size}) and the world ({world.world_size})", file=sys.stderr)
        return 2
    num_engines, engine_index, leader = world.world_size // group, world.rank // group, world.rank % group == 0
    output = os.path.abspath(ns.output_file)

    items = read_input(ns.input_file)
    done = done_keys(output)
    pending = [it for it in items if it.key not in done]
    world.barrier("scanned")  # nobody writes a part file before every rank has read them all
    mine = pending[engine_index::num_engines] if leader else []
    if world.rank == 0:
        logger.info("%d lines, %d already done, %d to run on %d engine(s), %d rank(s) each", len(items),
                    len(items) - len(pending), len(pending), num_engines, group)
    progress = Progress(world, len(pending), ns.progress_interval_s)
    if mine:
        from raylight import LLM
        from raylight.defaults import DEFAULT_MODEL_NAME

        engine_args["device"] = choose_device(engine_args.get("device"), world, group)
        model_name = ns.served_model_name or engine_args.get("model") or DEFAULT_MODEL_NAME
        window = ns.max_lines_in_flight or max(64, 4 * int(engine_args.get("max_num_seqs") or 16))
        writer = PartWriter(part_path(output, world.rank))
        try:
            with LLM(**engine_args) as llm:
                run_lines(llm, mine, writer, progress, model_name, ns.default_max_tokens, window)
        finally:
            writer.close()
    progress.tick(force=True)
    world.finish()
    if world.rank != 0:
        return 0
    while not world.all_finished():  # the others' rows keep the bar moving
        time.sleep(min(1.0, ns.progress_interval_s))
        progress.tick(force=True)
    progress.close()
    written, errors, missing = merge(output, items)
    print(f"{written} results in {ns.output_file} ({errors} with an error)", file=sys.stderr)
    if missing:
        print(f"error: {len(missing)} lines have no result (first: line {missing[0].line}); rerun to complete them",
              file=sys.stderr)
        return 1
    return 0
