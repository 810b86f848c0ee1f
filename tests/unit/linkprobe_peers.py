"""A link probe peer and an emulated link, each in a process of its own, as they are on separate
machines: at 1 Gbit/s a probe, its peer and a user-space link sharing one interpreter (and its GIL)
measure their own contention, not the link. Used by tests/unit/test_linkprobe.py and
bench/linkprobe_bench.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

PEER = """
import asyncio
from aiflow import linkprobe

async def main():
    server = await linkprobe.serve("edge", "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, input)  # until stdin closes

try:
    asyncio.run(main())
except EOFError:
    pass
"""

LINK = """
import sys
from aiflow.local.links import Link, LinkConfig, LinkProxy

rate, latency, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
proxy = LinkProxy(Link("device->edge", LinkConfig.symmetric(rate, latency)), ("127.0.0.1", port)).start()
print(proxy.port, flush=True)
try:
    input()  # until stdin closes
except EOFError:
    pass
proxy.stop()
"""


@contextlib.contextmanager
def _process(code: str, *args: str) -> Iterator[int]:
    """Run `code` in a new interpreter; yields the port it prints; ends it by closing its stdin."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"helper process did not start (printed {line!r})")
        yield int(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def peer_behind_link(rate: str, latency: str) -> Iterator[int]:
    """An edge peer behind an emulated link of `rate` and one-way `latency`: the link's port."""
    with _process(PEER) as peer, _process(LINK, rate, latency, str(peer)) as link:
        yield link
