import socket

import pytest

from raylight.utils import ports


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    lo, hi = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert not lo <= port <= hi or lo - ports.LOW < 1000
        assert not 30000 <= port <= 31000  # Serve's direct-ingress replicas bind there
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises if it was not free


def test_free_port_skips_a_port_in_use(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            other = s.getsockname()[1]
        draws = iter([taken, taken, other])
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(draws))
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.LOW + 5000, 65535))
        assert ports.free_port() == other


def test_free_port_falls_back_when_the_range_has_no_room(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.LOW + 10, 65535))
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


class _FakeServe:
    def __init__(self, failures: int, message: str = "Failed to bind to address '127.0.0.1:1'."):
        self.failures, self.message = failures, message
        self.ports: list[int] = []
        self.shutdowns = 0

    def start(self, http_options):
        self.ports.append(http_options["port"])
        if len(self.ports) <= self.failures:
            raise RuntimeError(self.message)

    def shutdown(self):
        self.shutdowns += 1


def test_serve_app_starts_serve_again_on_another_port_after_a_bind_failure():
    from raylight.testing.helpers import _start_serve

    serve = _FakeServe(failures=2)
    port = _start_serve(serve)
    assert serve.ports[-1] == port and len(serve.ports) == 3 and serve.shutdowns == 2


def test_serve_app_gives_up_after_its_attempts_and_passes_other_errors_on():
    from raylight.testing.helpers import _start_serve

    with pytest.raises(RuntimeError, match="bind"):
        _start_serve(_FakeServe(failures=5), attempts=3)
    other = _FakeServe(failures=1, message="something else")
    with pytest.raises(RuntimeError, match="something else"):
        _start_serve(other)
    assert other.shutdowns == 0
