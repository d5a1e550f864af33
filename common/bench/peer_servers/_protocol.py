"""The line protocol a peer server speaks with common/bench/peer_process.py.

A peer engine (llama.cpp, vLLM) runs in its own process, started by the benchmark worker with
the interpreter that has the engine installed. Requests and replies are one JSON object per
line: the server's stdin carries requests, and the process's original stdout carries replies
while everything the engine prints goes to stderr. Only the standard library is imported here:
the server's interpreter may be another virtualenv's, without this project's dependencies
(it runs `python -m common.bench.peer_servers.NAME_server` with only this checkout on its path).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from collections.abc import Callable

Handler = Callable[[dict], dict]


def peak_rss_bytes() -> int:
    """This process's peak RSS plus its finished children's (an engine core process)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return 1024 * (own + children)


def serve(setup: Callable[[dict], dict[str, Handler]]) -> None:
    """Read the setup message, build the handlers, then answer one request per line until
    stdin closes. A failing request answers {"error": one line}; a failing setup exits."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engine's own prints and logs go to stderr, never into a reply

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")

    try:
        handlers = setup(json.loads(sys.stdin.readline()))
    except Exception as e:
        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        sys.exit(1)
    reply({"ready": True, "peak_rss": peak_rss_bytes()})
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            out = handlers[msg["cmd"]](msg)
        except Exception as e:
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        reply({**out, "peak_rss": peak_rss_bytes()})
