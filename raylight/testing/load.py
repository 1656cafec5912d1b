"""A steady stream of HTTP requests for the scaling tests (tests/integration/test_autoscaling*.py), an app
served with the stream already running when it comes up, and a wait on a Serve deployment's replica
states."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"


class Load:
    """`clients` threads that each send completions back to back (streamed and not, alternately) until
    the context exits; records each request's (status, completion tokens, error text). `prompt_words`
    pads each prompt with that many words (long prompts go through a disaggregated app's prefill pool).
    Started before the app is up, it records nothing until its first success (`ready`, at `ready_t`):
    failures before that are the app not being there yet."""

    def __init__(self, base: str, clients: int, max_tokens: int, prompt_words: int = 0, model: str = MODEL):
        self.base, self.max_tokens, self.model, self.stop = base, max_tokens, model, threading.Event()
        self.pad = " ".join(f"word{i % 50}" for i in range(prompt_words))
        self.results: list[tuple[int, int, str]] = []
        self.ready, self.ready_t = threading.Event(), None
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.finish()

    def finish(self) -> None:
        """Stops the stream and waits for the requests in flight."""
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
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
                        result = (r.status_code, r.json()["usage"]["completion_tokens"] if ok else 0,
                                  "" if ok else r.text[:200])
                    else:
                        result = self._stream(c, body)
                except httpx.HTTPError as e:
                    result = (0, 0, repr(e))
                if result[0] == 200 and not self.ready.is_set():
                    self.ready_t = time.monotonic()
                    self.ready.set()
                if self.ready.is_set():
                    self.results.append(result)
                else:
                    time.sleep(0.2)  # the app is not up yet

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


@contextlib.contextmanager
def serve_app_under_load(cfg, name: str, timeout_s: float = 240, **load_kwargs):
    """Like helpers.serve_app (the app on this process's local Ray + Serve, deleted after), with a
    `Load(**load_kwargs)` streaming from before `serve.run`: an autoscaling pool comes up already loaded,
    so it cannot scale down idle before a test's stream starts. Yields (base URL, the load), the load
    running; stops it and deletes the app after."""
    from ray import serve

    from raylight.cluster.app import build_app
    from raylight.testing.helpers import delete_apps, local_serve

    base = f"http://127.0.0.1:{local_serve()}"
    load = Load(base, **load_kwargs)
    try:
        with load:
            serve.run(build_app(cfg), name=name, route_prefix="/")
            if not load.ready.wait(timeout_s):
                raise TimeoutError(f"the {name} server answered no request in {timeout_s:.0f}s")
            yield base, load
    finally:
        delete_apps(name)


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
