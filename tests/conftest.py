"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch

from dp_diffusion.allocator import keep_freed_memory

keep_freed_memory()  # as the `dp-diffusion` command does


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on shared CPUs a second OpenMP thread mostly spins and waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Fail any connection that leaves this machine (loopback stays allowed)."""
    import socket

    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
