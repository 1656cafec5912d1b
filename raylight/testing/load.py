"""A steady stream of HTTP requests for the scaling tests (tests/integration/test_autoscaling*.py), and a
wait on a Serve deployment's replica states."""

from __future__ import annotations

import json
import threading
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"


class Load:
    """`clients` threads that each send completions back to back (streamed and not, alternately) until
    the context exits; records each request's (status, completion tokens, error text). `prompt_words`
    pads each prompt with that many words (long prompts go through a disaggregated app's prefill pool)."""

    def __init__(self, base: str, clients: int, max_tokens: int, prompt_words: int = 0, model: str = MODEL):
        self.base, self.max_tokens, self.model, self.stop = base, max_tokens, model, threading.Event()
        self.pad = " ".join(f"word{i % 50}" for i in range(prompt_words))
        self.results: list[tuple[int, int, str]] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _client(self, i: int) -> None:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        n = 0
        with httpx.Client(base_url=self.base, timeout=httpx.Timeout(120.0)) as c:
            while not self.stop.is_set():
                n += 1
                body["prompt"] = f"Client {i} asks question {n}: tell me about the sea. {self.pad}"
                try:
                    if n % 2:
                        r = c.post("/v1/completions", json=body)
                        ok = r.status_code == 200
                        self.results.append((r.status_code, r.json()["usage"]["completion_tokens"] if ok else 0,
                                             "" if ok else r.text[:200]))
                    else:
                        self.results.append(self._stream(c, body))
                except httpx.HTTPError as e:
                    self.results.append((0, 0, repr(e)))

    @staticmethod
    def _stream(c: httpx.Client, body) -> tuple[int, int, str]:
        tokens, error = 0, ""
        with c.stream("POST", "/v1/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                return r.status_code, 0, r.read().decode()[:200]
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = line[:200]
                elif event.get("usage"):
                    tokens = event["usage"].get("completion_tokens", tokens)
        return (200 if not error else 500), tokens, error

    def check_all_complete(self) -> None:
        bad = [r for r in self.results if r[0] != 200 or r[1] != self.max_tokens]
        assert not bad, f"{len(bad)} of {len(self.results)} requests failed or were cut: {bad[:5]}"


def replica_states(app: str, *deployments: str) -> dict[str, dict[str, int]]:
    """{deployment: {replica state: count}} of a Serve app's deployments."""
    from ray import serve

    deps = serve.status().applications[app].deployments
    return {name: dict(deps[name].replica_states) for name in deployments}


def wait_replica_states(app: str, want: dict[str, dict[str, int]], timeout_s: float) -> float:
    """Seconds until the deployments' replica states are exactly `want`; AssertionError after timeout_s."""
    t0 = time.monotonic()
    while (states := replica_states(app, *want)) != want:
        assert time.monotonic() - t0 < timeout_s, f"replica states {states}, wanted {want}"
        time.sleep(0.2)
    return time.monotonic() - t0
