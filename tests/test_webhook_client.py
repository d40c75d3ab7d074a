"""The webhook client's socket handling: whatever a connection attempt raises, the socket it
opened is closed (a leaked socket holds a file descriptor until the garbage collector runs)."""

import socket

import pytest

from app.webhook_policy import Target
from workers import webhook_client


def test_a_connect_that_raises_anything_closes_its_socket(monkeypatch):
    opened = []

    def connect(self, address):
        opened.append(self)
        raise OverflowError("port must be 0-65535")  # not an OSError

    monkeypatch.setattr(socket.socket, "connect", connect)
    target = Target("http", "127.0.0.1", 9, "/hook", ("127.0.0.1",))
    with pytest.raises(OverflowError):
        webhook_client.post(target, b"{}", {}, timeout=1.0)
    [sock] = opened
    assert sock.fileno() == -1  # closed, not left to the garbage collector


def test_a_refused_connection_closes_its_socket(monkeypatch):
    opened = []

    def connect(self, address):
        opened.append(self)
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(socket.socket, "connect", connect)
    target = Target("http", "127.0.0.1", 9, "/hook", ("127.0.0.1", "127.0.0.2"))
    with pytest.raises(webhook_client.DeliveryFailed, match="127.0.0.1: refused; 127.0.0.2"):
        webhook_client.post(target, b"{}", {}, timeout=1.0)
    assert len(opened) == 2 and all(s.fileno() == -1 for s in opened)
