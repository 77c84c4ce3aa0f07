"""The HTTP protocol guards on a real uvicorn server on loopback: 431 for huge headers, 408 for slow headers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from prodcat.config import ServeConfig
from prodcat.serve.app import create_app, uvicorn_options


@pytest.fixture
def server(make_predictor: Callable) -> Iterator[tuple[str, int]]:
    config = ServeConfig(port=0, header_timeout_s=0.5, max_header_bytes=16 * 1024)
    options = {**uvicorn_options(config), "log_level": "warning", "lifespan": "on"}
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(make_predictor(), config), **options))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = uvicorn_server.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


def _read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_megabyte_of_headers_gets_431_not_a_reset(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
        sock.sendall(request)  # the server keeps reading (and dropping) what follows its answer
        sock.shutdown(socket.SHUT_WR)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:200]
    assert b"over 16384 bytes" in answer


def test_headers_trickling_in_are_cut_off_with_408(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(4):  # a byte every 0.2 s would keep uvicorn's own keep-alive timer from ever firing
            time.sleep(0.2)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - start < 5


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_normal_requests_and_keep_alive_still_work(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        for _ in range(3):  # the header timer is re-armed for each request on the same connection
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            time.sleep(0.3)  # under the header timeout each time, over it in all
