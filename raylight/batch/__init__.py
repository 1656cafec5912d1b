"""Offline data-parallel batch jobs: OpenAI batch files through raylight engines, one per torchrun rank
(or per group of tensor_parallel_size ranks).

    torchrun --nproc-per-node 2 -m raylight.batch -i requests.jsonl -o results.jsonl --model M

`raylight/batch/job.py` runs the job (ranks, engines, progress), `lines.py` reads the input and writes,
resumes and merges the results, `responses.py` validates a line's request and builds its result row.
"""
