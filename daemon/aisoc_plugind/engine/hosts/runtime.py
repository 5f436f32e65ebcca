"""The plugin host's side: serve load, run, cancel and teardown requests on one socket.

This runs in a host process forked by the zygote, after the sandbox is in place. The host
gets the verified bytes of each plugin in its LOAD request and imports them from memory with
the daemon's loader (a private package per load, no `sys.path`, no bytecode); it never opens
plugin code on disk. Async `run()`s are tasks on the host's event loop; sync ones run in a
bounded thread pool. Whatever a plugin raises or returns becomes a coded answer; the host
itself exits only when asked (STOP), when the supervisor goes away (end of the socket), or
after a MemoryError (exit status `MEMORY_EXIT`, so the supervisor restarts it as `memory`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.thread  # imported here, in the zygote, not after each fork
import contextlib
import functools
import inspect
import json
import marshal
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any, cast

from aisoc_plugind.core.gcpause import BULK_LOAD
from aisoc_plugind.core.redact import NO_REDACTION, Redactor
from aisoc_plugind.engine.hosts.faults import (
    Raised,
    cancelled_here,
    captured,
    describe,
    type_name,
)
from aisoc_plugind.engine.hosts.jsondepth import (
    MAX_RESULT_DEPTH,
    deeper_than,
    unserialisable,
)
from aisoc_plugind.engine.hosts.loader import (
    ImportedBundle,
    entry_module_name,
    import_bundle,
    takes_config,
)
from aisoc_plugind.engine.hosts.protocol import MAX_TO_HOST, Frame, FrameReader, Kind, encode

__all__ = ["MEMORY_EXIT", "HostOptions", "serve"]

MEMORY_EXIT = 86  # the host ran out of memory (RLIMIT_AS): restart it, reason "memory"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostOptions:
    """What the supervisor tells a host at start."""

    max_result_bytes: int
    concurrency: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostOptions:
        return cls(
            max_result_bytes=int(data["max_result_bytes"]), concurrency=int(data["concurrency"])
        )

    def to_json(self) -> dict[str, int]:
        return {"max_result_bytes": self.max_result_bytes, "concurrency": self.concurrency}


class _Failure(Exception):
    """A coded failure to answer with (`fault`: the type of what the plugin raised)."""

    def __init__(self, code: str, message: str, fault: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fault = fault


class _StillRunning(Exception):
    """A cancelled sync run whose thread goes on: the call is not answered."""


@dataclass(slots=True)
class _Loaded:
    instance: Any
    imported: ImportedBundle
    is_async: bool
    redactor: Redactor  # the plugin's configuration values, out of what its hooks raise


class _Host:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: HostOptions
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.options = options
        self.plugins: dict[str, _Loaded] = {}
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, options.concurrency), thread_name_prefix="plugin"
        )
        self.encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

    def send(self, kind: Kind, header: dict[str, Any], blob: bytes = b"") -> None:
        self.writer.write(encode(kind, header, blob))

    def fail(self, call_id: int, code: str, message: str, fault: str | None = None) -> None:
        header: dict[str, Any] = {"id": call_id, "code": code, "message": message}
        if fault is not None:
            header["fault"] = fault
        self.send(Kind.ERROR, header)

    async def serve(self) -> None:
        frames = FrameReader(self.reader, MAX_TO_HOST)
        while True:
            try:
                batch = await frames.frames()
            except EOFError:
                return  # the supervisor is gone
            for frame in batch:
                if frame.kind is Kind.STOP:
                    await self.stop()
                    return
                self.dispatch(frame)
            await self.writer.drain()

    def dispatch(self, frame: Frame) -> None:
        header = frame.header
        call_id = int(header.get("id", 0))
        if frame.kind is Kind.CANCEL:
            task = self.calls.get(call_id)
            if task is not None:
                task.cancel()
            return
        handler = {Kind.LOAD: self.load, Kind.RUN: self.run, Kind.TEARDOWN: self.teardown}.get(
            frame.kind
        )
        if handler is None:
            self.fail(call_id, "host_protocol_error", f"unexpected {frame.kind.name}")
            return
        task = asyncio.ensure_future(self.guarded(handler, call_id, frame))
        self.calls[call_id] = task
        task.add_done_callback(functools.partial(self.finished, call_id))
        if frame.kind is Kind.LOAD:
            # A discovery sends a group's loads at once: the collector stays off from the
            # first one's arrival until the last one is answered (see core.gcpause).
            pause = BULK_LOAD
            pause.__enter__()
            task.add_done_callback(lambda _: pause.__exit__(None, None, None))

    def finished(self, call_id: int, task: asyncio.Task[None]) -> None:
        self.calls.pop(call_id, None)
        if task.cancelled():  # cancelled before it started: `guarded` never ran to answer
            self.fail(call_id, "plugin_cancelled", "cancelled by the supervisor")

    async def guarded(
        self, handler: Callable[[int, Frame], Any], call_id: int, frame: Frame
    ) -> None:
        try:
            await handler(call_id, frame)
        except _Failure as exc:
            self.fail(call_id, exc.code, exc.message, exc.fault)
        except _StillRunning:
            pass  # no answer: the supervisor ends this host when its cancel goes unanswered
        except asyncio.CancelledError:
            self.fail(call_id, "plugin_cancelled", "cancelled by the supervisor")
        except MemoryError:
            self.fail(call_id, "plugin_memory_exceeded", "the host ran out of memory")
            with contextlib.suppress(Exception):
                await self.writer.drain()
            os._exit(MEMORY_EXIT)
        except BaseException as exc:
            self.fail(call_id, "plugin_error", f"host error ({type_name(exc)})")

    # -- requests ---------------------------------------------------------------------

    async def load(self, call_id: int, frame: Frame) -> None:
        header = frame.header
        key, entry_point = str(header["key"]), str(header["entry_point"])
        sources: dict[str, bytes] = {}
        compiled: dict[str, bytes] = {}
        offset = 0
        for parts, listing in ((sources, header["files"]), (compiled, header.get("code") or [])):
            for rel, size in listing:
                parts[str(rel)] = frame.blob[offset : offset + int(size)]
                offset += int(size)
        if offset != len(frame.blob):
            raise _Failure("host_protocol_error", "the files do not add up to the blob")
        from pathlib import Path

        root = Path(str(header["root"]))
        config = header.get("config") or {}
        redactor = Redactor(config.values()) if isinstance(config, dict) else NO_REDACTION
        build = functools.partial(
            _import_and_construct, root, sources, compiled, entry_point, config, redactor
        )
        loaded = await asyncio.get_running_loop().run_in_executor(self.pool, build)
        try:
            await _call_hook(loaded.instance, "setup", "plugin_setup_failed", self.pool, redactor)
        except BaseException:
            loaded.imported.release()
            raise
        self.plugins[key] = loaded
        self.send(Kind.LOADED, {"id": call_id, "key": key})

    async def run(self, call_id: int, frame: Frame) -> None:
        header = frame.header
        loaded = self.plugins.get(str(header.get("key")))
        if loaded is None:
            raise _Failure("plugin_not_loaded", "this host holds no such plugin")
        payload, context = header.get("payload") or {}, header.get("context") or {}
        try:
            if loaded.is_async:
                value = await loaded.instance.run(payload, context)
            else:
                call = captured(functools.partial(_call_run, loaded.instance, payload, context))
                try:
                    value = await asyncio.get_running_loop().run_in_executor(self.pool, call)
                except asyncio.CancelledError:
                    # Ours (the thread's own exceptions come back as values). A thread cannot
                    # be stopped: saying "cancelled" would leave it running in a host that
                    # looks healthy.
                    raise _StillRunning from None
                if isinstance(value, Raised):
                    raise value.exc
                if inspect.isawaitable(value):
                    value = await value
        except (MemoryError, _StillRunning):
            raise
        except BaseException as exc:
            if cancelled_here(exc):
                raise  # the supervisor's CANCEL: answered `plugin_cancelled`
            # The type only: the text can quote the payload or the configuration.
            name = type_name(exc)
            raise _Failure("plugin_error", f"plugin raised {name}", name) from exc
        self.send(Kind.RESULT, {"id": call_id}, self.result_bytes(value))

    def result_bytes(self, value: Any) -> bytes:
        try:
            result = value if isinstance(value, dict) else {"result": value}
            text = self.encode(result)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _Failure("plugin_result_invalid", unserialisable(exc)) from exc
        except MemoryError:
            raise
        except BaseException as exc:  # the plugin's own objects ran code (nothing is awaited)
            raise _Failure(
                "plugin_result_invalid", f"the result could not be encoded ({type_name(exc)})"
            ) from exc
        if deeper_than(result, text):
            raise _Failure(
                "plugin_result_invalid",
                f"the result is nested deeper than {MAX_RESULT_DEPTH} levels",
            )
        data = text.encode("utf-8")
        if len(data) > self.options.max_result_bytes:
            raise _Failure(
                "plugin_result_too_large",
                f"the result is {len(data)} bytes, over plugins.max_result_bytes "
                f"({self.options.max_result_bytes})",
            )
        return data

    async def teardown(self, call_id: int, frame: Frame) -> None:
        loaded = self.plugins.pop(str(frame.header.get("key")), None)
        if loaded is not None:
            await self._tear_down(loaded)
        self.send(Kind.DONE, {"id": call_id})

    async def _tear_down(self, loaded: _Loaded) -> None:
        """Call the plugin's teardown (a coded error if it fails), then drop its modules."""
        try:
            await _call_hook(
                loaded.instance, "teardown", "plugin_teardown_failed", self.pool, loaded.redactor
            )
        finally:
            loaded.imported.release()

    async def stop(self) -> None:
        for key in list(self.plugins):
            with contextlib.suppress(BaseException):
                await self._tear_down(self.plugins.pop(key))
        with contextlib.suppress(Exception):
            await self.writer.drain()


def _import_and_construct(
    root: Any,
    sources: dict[str, bytes],
    compiled: dict[str, bytes],
    entry_point: str,
    config: dict[str, Any],
    redactor: Redactor,
) -> _Loaded:
    """Import the bytes (with the code the supervisor's scan compiled from them, when sent)
    and build `Plugin`: one worker-thread hop for both. Raises _Failure (or MemoryError)."""
    imported = _import(root, sources, _code_objects(compiled), entry_point, redactor)
    try:
        instance, is_async = _construct(imported, entry_point, config, redactor)
    except BaseException:
        imported.release()
        raise
    return _Loaded(instance=instance, imported=imported, is_async=is_async, redactor=redactor)


def _call_run(instance: Any, payload: dict[str, Any], context: dict[str, Any]) -> Any:
    """Call a sync `run` (in a worker thread: even looking `run` up can run plugin code)."""
    return instance.run(payload, context)


def _code_objects(compiled: dict[str, bytes]) -> dict[str, CodeType]:
    code: dict[str, CodeType] = {}
    for rel, data in compiled.items():
        try:
            value = marshal.loads(data)  # noqa: S302 - from the supervisor, which we trust
        except (EOFError, ValueError, TypeError) as exc:
            raise _Failure("host_protocol_error", f"undecodable code for {rel}") from exc
        if not isinstance(value, CodeType):
            raise _Failure("host_protocol_error", f"the code for {rel} is not a code object")
        code[rel] = value
    return code


def _import(
    root: Any,
    sources: dict[str, bytes],
    code: dict[str, CodeType],
    entry_point: str,
    redactor: Redactor,
) -> ImportedBundle:
    try:
        return import_bundle(root, sources, entry_point, code)
    except MemoryError:
        raise
    except BaseException as exc:  # whatever the module code raises (in a worker thread)
        text = describe(exc, redactor)
        leaf = entry_module_name(entry_point).rsplit(".", 1)[-1]
        missing = isinstance(exc, ModuleNotFoundError) and leaf in text
        raise _Failure(
            "plugin_entry_missing" if missing else "plugin_import_failed",
            f"importing {entry_point} raised {text}",
        ) from exc


def _construct(
    imported: ImportedBundle, entry_point: str, config: dict[str, Any], redactor: Redactor
) -> tuple[Any, bool]:
    """Build `Plugin`; return it and whether its `run` is a coroutine function."""
    try:
        cls: Any = getattr(imported.module, "Plugin", None)
        if not inspect.isclass(cls):
            raise _Failure("plugin_class_missing", f"{entry_point} defines no class Plugin")
        if not callable(getattr(cls, "run", None)):
            raise _Failure(
                "plugin_class_missing", "class Plugin has no run(payload, context) method"
            )
        factory = cast(Callable[..., Any], cls)
        instance = factory(dict(config)) if takes_config(cls) else factory()
        return instance, inspect.iscoroutinefunction(instance.run)
    except (_Failure, MemoryError):
        raise
    except BaseException as exc:  # whatever the plugin's class raises (in a worker thread)
        raise _Failure("plugin_init_failed", f"Plugin() raised {describe(exc, redactor)}") from exc


async def _call_hook(
    instance: object,
    name: str,
    code: str,
    pool: concurrent.futures.Executor,
    redactor: Redactor,
) -> None:
    """Call an optional hook: a sync one in the pool, an async one on the loop. Whatever
    it raises (its own CancelledError too) is a _Failure with `code`; only the supervisor's
    cancellation and MemoryError pass."""
    try:
        hook = getattr(instance, name, None)
        if hook is None:
            return
        if inspect.iscoroutinefunction(hook):
            await hook()
        else:
            outcome = await asyncio.get_running_loop().run_in_executor(pool, captured(hook))
            if isinstance(outcome, Raised):
                raise outcome.exc
            if inspect.isawaitable(outcome):
                await outcome
    except MemoryError:
        raise
    except BaseException as exc:
        if cancelled_here(exc):
            raise
        raise _Failure(code, f"{name}() raised {describe(exc, redactor)}") from exc


async def _main(sock: socket.socket, options: HostOptions, hello: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**16)
    host = _Host(reader, writer, options)
    host.send(Kind.HELLO, {"pid": os.getpid(), **hello})
    await writer.drain()
    try:
        await host.serve()
    finally:
        host.pool.shutdown(wait=False, cancel_futures=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def serve(sock: socket.socket, options: HostOptions, hello: dict[str, Any]) -> int:
    """Run the host until STOP or the end of the socket; return the exit status (0)."""
    asyncio.run(_main(sock, options, hello))
    return 0
