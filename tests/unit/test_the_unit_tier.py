"""The unit tier keeps its promise: a test here cannot open a socket or start a process unnoticed."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def test_connecting_a_socket_fails_the_test_and_says_where_it_belongs():
    with socket.socket() as sock, pytest.raises(pytest.fail.Exception, match=r"connect a socket.*belongs in tests/"):
        sock.connect(("127.0.0.1", 9))


def test_binding_a_socket_fails_the_test():
    with socket.socket() as sock, pytest.raises(pytest.fail.Exception, match="bind a socket"):
        sock.bind(("127.0.0.1", 0))


def test_starting_a_subprocess_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match="start a subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
