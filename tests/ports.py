"""A free TCP port for each multi-process launch (a fixed port per test process collides
with the previous launch's socket still in TIME_WAIT)."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
