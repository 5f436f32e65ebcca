"""The host's side of the protocol, driven frame by frame over a real socketpair.

The host runtime normally runs in a sandboxed child process, where coverage cannot follow
it; here the same code (`runtime._main`) serves one end of a socketpair on a thread of the
test process while the test plays the supervisor on the other end. Every answer a host can
give is asked for: loads that fail at each step, runs that raise, return junk or too much,
cancels, teardowns, STOP and the end of the socket.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aisoc_plugind.engine.hosts import runtime
from aisoc_plugind.engine.hosts.protocol import Frame, Kind, encode

_PREFIX = struct.Struct(">IBI")
TIMEOUT_S = 10.0

PLUGIN = textwrap.dedent(
    """
    import asyncio, threading
    class Boom(BaseException):
        pass
    GATE = threading.Event()
    class Plugin:
        def __init__(self, config):
            self.config = config
            self.torn = False
        def setup(self):
            if self.config.get("fail") == "setup":
                raise RuntimeError("setup broke")
        def run(self, payload, context):
            what = payload.get("do")
            if what == "echo":
                return {"payload": payload, "context": context, "config": self.config}
            if what == "scalar":
                return 42
            if what == "boom":
                raise Boom("custom base exception")
            if what == "keyboard":
                raise KeyboardInterrupt
            if what == "junk":
                return {"x": object()}
            if what == "nan":
                return {"x": float("nan")}
            if what == "big":
                return {"x": "y" * 5000}
            if what == "deep":
                value = []
                for _ in range(100000):
                    value = [value]
                return {"x": value}
            if what == "awaitable":
                async def later():
                    return {"late": True}
                return later()
            if what == "memory":
                raise MemoryError
            return {}
        def teardown(self):
            if self.config.get("fail") == "teardown":
                raise ValueError("teardown broke")
    """
)

ASYNC_PLUGIN = textwrap.dedent(
    """
    import asyncio
    class Plugin:
        async def setup(self):
            self.ready = True
        async def run(self, payload, context):
            if payload.get("do") == "wait":
                await asyncio.sleep(60)
            if payload.get("do") == "fail":
                raise SystemExit(3)
            return {"ready": self.ready}
        async def teardown(self):
            pass
    """
)


class Supervisor:
    """The test's end of the socketpair: send frames, read answers (blocking, with a timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT_S)
        self.ids = iter(range(1, 1_000_000))

    def send(self, kind: Kind, header: dict[str, Any], blob: bytes = b"") -> None:
        self.sock.sendall(encode(kind, header, blob))

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def read(self) -> Frame:
        length, kind, head = _PREFIX.unpack(self._exactly(_PREFIX.size))
        body = self._exactly(length - 5)
        return Frame(Kind(kind), json.loads(body[:head]), body[head:])

    def call(self, kind: Kind, header: dict[str, Any], blob: bytes = b"") -> Frame:
        call_id = next(self.ids)
        self.send(kind, {"id": call_id, **header}, blob)
        frame = self.read()
        assert frame.header["id"] == call_id
        return frame

    def load(
        self,
        key: str,
        files: dict[str, str],
        *,
        entry_point: str = "plugin.py",
        config: dict[str, Any] | None = None,
        blob_extra: bytes = b"",
    ) -> Frame:
        items = sorted((rel, text.encode()) for rel, text in files.items())
        header = {
            "key": key,
            "plugin_id": key,
            "entry_point": entry_point,
            "root": f"/nonexistent/{key}",
            "config": config or {},
            "files": [[rel, len(data)] for rel, data in items],
        }
        return self.call(Kind.LOAD, header, b"".join(d for _, d in items) + blob_extra)

    def run(self, key: str, payload: dict[str, Any]) -> Frame:
        return self.call(Kind.RUN, {"key": key, "payload": payload, "context": {"c": 1}})


@pytest.fixture
def host() -> Iterator[tuple[Supervisor, threading.Thread]]:
    """A host runtime serving one end of a socketpair on a thread; the test has the other."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    options = runtime.HostOptions(max_result_bytes=4096, concurrency=2)
    thread = threading.Thread(
        target=runtime.serve, args=(theirs, options, {"sandbox": {"test": True}}), daemon=True
    )
    thread.start()
    supervisor = Supervisor(ours)
    hello = supervisor.read()
    assert hello.kind is Kind.HELLO
    assert hello.header["sandbox"] == {"test": True}
    try:
        yield supervisor, thread
    finally:
        ours.close()
        thread.join(TIMEOUT_S)
        theirs.close()


def test_options_round_trip() -> None:
    options = runtime.HostOptions(max_result_bytes=10, concurrency=3)
    assert runtime.HostOptions.from_json(options.to_json()) == options


def test_a_loaded_plugin_runs_with_its_config(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    loaded = sup.load("a", {"plugin.py": PLUGIN}, config={"api_key": "k"})
    assert (loaded.kind, loaded.header["key"]) == (Kind.LOADED, "a")
    result = sup.run("a", {"do": "echo"})
    assert result.kind is Kind.RESULT
    assert json.loads(result.blob) == {
        "payload": {"do": "echo"},
        "context": {"c": 1},
        "config": {"api_key": "k"},
    }
    assert json.loads(sup.run("a", {"do": "scalar"}).blob) == {"result": 42}
    assert json.loads(sup.run("a", {"do": "awaitable"}).blob) == {"late": True}


def test_async_plugins_run_on_the_hosts_loop(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    assert sup.load("b", {"plugin.py": ASYNC_PLUGIN}).kind is Kind.LOADED
    assert json.loads(sup.run("b", {}).blob) == {"ready": True}
    failed = sup.run("b", {"do": "fail"})
    assert (failed.kind, failed.header["code"], failed.header["fault"]) == (
        Kind.ERROR,
        "plugin_error",
        "SystemExit",
    )


@pytest.mark.parametrize(
    ("do", "code", "fault"),
    [
        ("boom", "plugin_error", "Boom"),
        ("keyboard", "plugin_error", "KeyboardInterrupt"),
        ("junk", "plugin_result_invalid", None),
        ("nan", "plugin_result_invalid", None),
        ("deep", "plugin_result_invalid", None),
        ("big", "plugin_result_too_large", None),
    ],
)
def test_what_a_run_raises_or_returns_becomes_a_coded_error(
    host: tuple[Supervisor, Any], do: str, code: str, fault: str | None
) -> None:
    sup, _ = host
    sup.load("a", {"plugin.py": PLUGIN})
    answer = sup.run("a", {"do": do})
    assert answer.kind is Kind.ERROR
    assert answer.header["code"] == code
    assert answer.header.get("fault") == fault
    # the host keeps serving
    assert sup.run("a", {"do": "scalar"}).kind is Kind.RESULT


def test_an_error_message_is_bounded(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    source = "class Plugin:\n    def run(self, p, c):\n        raise ValueError('x' * 10000)\n"
    sup.load("long", {"plugin.py": source})
    answer = sup.run("long", {})
    assert answer.header["code"] == "plugin_error"
    assert len(answer.header["message"]) < 600


@pytest.mark.parametrize(
    ("files", "entry_point", "config", "code"),
    [
        ({"plugin.py": "raise KeyboardInterrupt\n"}, "plugin.py", {}, "plugin_import_failed"),
        ({"plugin.py": "def broken(:\n"}, "plugin.py", {}, "plugin_import_failed"),
        ({"plugin.py": "x = 1\n"}, "missing.py", {}, "plugin_entry_missing"),
        ({"plugin.py": "x = 1\n"}, "plugin.py", {}, "plugin_class_missing"),
        ({"plugin.py": "class Plugin:\n    pass\n"}, "plugin.py", {}, "plugin_class_missing"),
        (
            {
                "plugin.py": "class Plugin:\n  def __init__(self):\n    raise SystemExit\n"
                "  def run(self, p, c):\n    return {}\n"
            },
            "plugin.py",
            {},
            "plugin_init_failed",
        ),
        ({"plugin.py": PLUGIN}, "plugin.py", {"fail": "setup"}, "plugin_setup_failed"),
    ],
)
def test_a_load_that_fails_at_any_step_is_coded(
    host: tuple[Supervisor, Any],
    files: dict[str, str],
    entry_point: str,
    config: dict[str, Any],
    code: str,
) -> None:
    sup, _ = host
    answer = sup.load("bad", files, entry_point=entry_point, config=config)
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, code)
    assert sup.run("bad", {}).header["code"] == "plugin_not_loaded"
    assert sup.load("good", {"plugin.py": PLUGIN}).kind is Kind.LOADED


def test_files_that_do_not_add_up_are_a_protocol_error(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    answer = sup.load("a", {"plugin.py": PLUGIN}, blob_extra=b"trailing")
    assert answer.header["code"] == "host_protocol_error"


def test_a_frame_of_the_wrong_direction_is_refused(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    answer = sup.call(Kind.RESULT, {})
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, "host_protocol_error")


def test_an_unknown_plugin_is_not_run(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    assert sup.run("nobody", {}).header["code"] == "plugin_not_loaded"


def test_a_cancelled_async_run_is_answered_cancelled(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    sup.load("b", {"plugin.py": ASYNC_PLUGIN})
    sup.send(Kind.RUN, {"id": 500, "key": "b", "payload": {"do": "wait"}, "context": {}})
    sup.send(Kind.CANCEL, {"id": 999})  # nothing runs under this id: ignored
    sup.send(Kind.CANCEL, {"id": 500})
    answer = sup.read()
    assert (answer.header["id"], answer.header["code"]) == (500, "plugin_cancelled")
    # cancelled while it runs (another call's answer shows the loop went round)
    sup.send(Kind.RUN, {"id": 501, "key": "b", "payload": {"do": "wait"}, "context": {}})
    assert sup.run("b", {}).kind is Kind.RESULT
    sup.send(Kind.CANCEL, {"id": 501})
    answer = sup.read()
    assert (answer.header["id"], answer.header["code"]) == (501, "plugin_cancelled")


def test_a_memory_error_ends_the_host_with_its_status(
    host: tuple[Supervisor, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, _ = host
    statuses: list[int] = []

    def exit_(status: int) -> None:  # the real os._exit would end the test process
        statuses.append(status)

    monkeypatch.setattr(runtime.os, "_exit", exit_)
    sup.load("a", {"plugin.py": PLUGIN})
    answer = sup.run("a", {"do": "memory"})
    assert answer.header["code"] == "plugin_memory_exceeded"
    deadline = time.monotonic() + TIMEOUT_S  # the host exits right after its answer
    while not statuses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert statuses == [runtime.MEMORY_EXIT]


def test_teardown_answers_done_and_codes_its_failure(host: tuple[Supervisor, Any]) -> None:
    sup, _ = host
    sup.load("a", {"plugin.py": PLUGIN})
    assert sup.call(Kind.TEARDOWN, {"key": "a"}).kind is Kind.DONE
    assert sup.run("a", {}).header["code"] == "plugin_not_loaded"
    assert sup.call(Kind.TEARDOWN, {"key": "a"}).kind is Kind.DONE  # already gone
    sup.load("t", {"plugin.py": PLUGIN}, config={"fail": "teardown"})
    answer = sup.call(Kind.TEARDOWN, {"key": "t"})
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, "plugin_teardown_failed")


def test_stop_tears_everything_down_and_ends_the_host(
    host: tuple[Supervisor, threading.Thread],
) -> None:
    sup, thread = host
    sup.load("a", {"plugin.py": PLUGIN}, config={"fail": "teardown"})
    sup.load("b", {"plugin.py": ASYNC_PLUGIN})
    sup.send(Kind.STOP, {})
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()


def test_the_end_of_the_socket_ends_the_host(host: tuple[Supervisor, threading.Thread]) -> None:
    sup, thread = host
    sup.sock.shutdown(socket.SHUT_WR)
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()


def test_the_loaded_modules_are_released_on_teardown(host: tuple[Supervisor, Any]) -> None:
    import sys

    sup, _ = host
    before = set(sys.modules)
    sup.load("a", {"plugin.py": PLUGIN})
    added = set(sys.modules) - before
    assert added, "the plugin's private package is imported"
    sup.call(Kind.TEARDOWN, {"key": "a"})
    assert not (set(sys.modules) & added)


def test_a_host_never_reads_plugin_code_from_its_root(host: tuple[Supervisor, Any]) -> None:
    """The root named in LOAD does not exist: everything comes from the frame's blob."""
    sup, _ = host
    files = {
        "plugin.py": "from .helper import VALUE\n"
        "class Plugin:\n    def run(self, p, c):\n        return {'value': VALUE}\n",
        "helper.py": "VALUE = 7\n",
    }
    assert sup.load("a", files).kind is Kind.LOADED
    assert json.loads(sup.run("a", {}).blob) == {"value": 7}


def test_zygote_messages_carry_json_and_descriptors() -> None:
    """The zygote's control channel: one JSON object a packet, descriptors as SCM_RIGHTS."""
    from aisoc_plugind.engine.hosts import zygote

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        zygote.send(left, {"op": "spawn", "n": 1}, [w])
        message, fds = zygote.receive(right)
        assert message == {"op": "spawn", "n": 1}
        assert len(fds) == 1
        os.write(fds[0], b"through the passed descriptor")
        os.close(fds[0])
        assert os.read(r, 100) == b"through the passed descriptor"
        zygote.send(left, {"op": "plain"})
        assert zygote.receive(right) == ({"op": "plain"}, [])
        left.send(b"[1, 2]")
        with pytest.raises(ValueError, match="JSON object"):
            zygote.receive(right)
        left.close()
        assert zygote.receive(right) == (None, [])
    finally:
        for fd in (r, w):
            os.close(fd)
        right.close()


def test_a_host_that_cannot_start_says_why_in_its_hello() -> None:
    from aisoc_plugind.engine.hosts import zygote

    data = zygote._hello_failure("sandbox_failed", "no Landlock")
    length, kind, head = _PREFIX.unpack(data[: _PREFIX.size])
    assert (length, Kind(kind)) == (len(data) - 4, Kind.HELLO)
    header = json.loads(data[_PREFIX.size : _PREFIX.size + head])
    assert header["error"] == {"code": "sandbox_failed", "message": "no Landlock"}


def test_the_zygote_finds_its_children_and_copes_without_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep of orphans lists a parent's children from /proc; without /proc it finds
    none (and the zygote keeps running) rather than failing."""
    import subprocess
    import sys

    from aisoc_plugind.engine.hosts import zygote

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in zygote._children(os.getpid())
        assert child.pid not in zygote._children(child.pid)

        def no_proc(path: str) -> Any:
            raise FileNotFoundError(path)

        monkeypatch.setattr(zygote.os, "scandir", no_proc)
        assert zygote._children(os.getpid()) == []
    finally:
        child.kill()
        child.wait()
