#!/usr/bin/env python3
"""Tests for scripts/image/airlock-agent, on the host, against a tiny fake
Anthropic Messages API (stdlib only). The end-to-end test through a sandbox
is tests/model.rs.

    python3 scripts/test-airlock-agent.py [-v]
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image", "airlock-agent")


def sse(events):
    out = []
    for ev in events:
        out.append(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n")
    return out


def tool_turn(tool_id, name, args, text="Working."):
    """A streamed assistant turn: some text, then one tool call whose input
    arrives in two JSON pieces."""
    raw = json.dumps(args)
    mid = len(raw) // 2
    return sse([
        {"type": "message_start", "message": {"id": "m", "role": "assistant", "content": [],
                                              "usage": {"input_tokens": 10, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": raw[:mid]}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": raw[mid:]}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    ])


def text_turn(*pieces):
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
               for p in pieces]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"},
    ]
    return sse(events)


class FakeApi:
    """Answers each POST /v1/messages with the next scripted answer: a list of
    SSE strings (streamed, chunked), or (status, json) for an error. A
    `threading.Event` in the list pauses the stream until it is set."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                api.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                answer = api.answers.pop(0) if api.answers else (500, {"type": "error", "error": {
                    "type": "api_error", "message": "script exhausted"}})
                if isinstance(answer, tuple):
                    status, payload = answer
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for piece in answer:
                    if isinstance(piece, threading.Event):
                        piece.wait(10)
                        continue
                    data = piece.encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class AgentTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.workdir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def run_agent(self, api, *args):
        env = dict(os.environ, ANTHROPIC_BASE_URL=api.url, ANTHROPIC_API_KEY="airlock-placeholder")
        return subprocess.run(
            [sys.executable, AGENT, "--workdir", self.workdir, *args],
            env=env, capture_output=True, text=True, timeout=60,
        )

    def test_a_multi_turn_tool_use_task(self):
        api = FakeApi([
            tool_turn("t1", "bash", {"command": "echo hi > f.txt; cat f.txt; echo oops >&2; exit 3"}),
            tool_turn("t2", "write_file", {"path": "out/sub/a.txt", "content": "ünïcode\n"}),
            tool_turn("t3", "write_file", {"path": "../escape.txt", "content": "x"}),
            tool_turn("t4", "write_file", {"path": "/etc/evil", "content": "x"}),
            text_turn("All ", "done."),
        ])
        try:
            r = self.run_agent(api, "--model", "m-test", "do", "the", "task")
        finally:
            api.close()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Working.", r.stdout)
        self.assertIn("All done.", r.stdout)
        with open(os.path.join(self.workdir, "f.txt")) as f:
            self.assertEqual(f.read(), "hi\n")
        with open(os.path.join(self.workdir, "out/sub/a.txt"), encoding="utf-8") as f:
            self.assertEqual(f.read(), "ünïcode\n")
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.workdir), "escape.txt")))
        self.assertEqual(len(api.requests), 5)
        first = api.requests[0]
        self.assertEqual(first["path"], "/v1/messages")
        self.assertEqual(first["headers"]["x-api-key"], "airlock-placeholder")
        self.assertEqual(first["headers"]["anthropic-version"], "2023-06-01")
        self.assertEqual(first["body"]["model"], "m-test")
        self.assertTrue(first["body"]["stream"])
        self.assertEqual(first["body"]["messages"], [{"role": "user", "content": "do the task"}])
        self.assertEqual({t["name"] for t in first["body"]["tools"]}, {"bash", "write_file"})

        def result(i):
            msgs = api.requests[i]["body"]["messages"]
            assistant, user = msgs[-2], msgs[-1]
            self.assertEqual(assistant["role"], "assistant")
            tool_use = assistant["content"][-1]
            self.assertEqual(tool_use["type"], "tool_use")
            (res,) = user["content"]
            self.assertEqual(res["tool_use_id"], tool_use["id"])
            return tool_use, res

        tool_use, res = result(1)
        self.assertEqual(tool_use["input"], {"command": "echo hi > f.txt; cat f.txt; echo oops >&2; exit 3"})
        self.assertIn("hi\n", res["content"])
        self.assertIn("oops", res["content"])
        self.assertIn("exit code: 3", res["content"])
        self.assertTrue(res["is_error"])
        _, res = result(2)
        self.assertNotIn("is_error", res)
        _, res = result(3)
        self.assertTrue(res["is_error"])
        self.assertIn("'..'", res["content"])
        _, res = result(4)
        self.assertTrue(res["is_error"])
        self.assertIn("absolute paths are refused", res["content"])
        self.assertIn("done after 5 turn(s)", r.stderr)
        self.assertIn("tokens in 45, out 31", r.stderr)

    def test_text_is_printed_as_it_streams(self):
        release = threading.Event()
        events = text_turn("first-piece ", "second-piece")
        # The stream stops after the first delta until the test has seen it
        # on the agent's stdout.
        api = FakeApi([events[:3] + [release] + events[3:]])
        env = dict(os.environ, ANTHROPIC_BASE_URL=api.url, ANTHROPIC_API_KEY="k")
        try:
            p = subprocess.Popen([sys.executable, AGENT, "--workdir", self.workdir, "hi"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            got = queue.Queue()
            threading.Thread(target=lambda: got.put(p.stdout.read(len(b"first-piece "))),
                             daemon=True).start()
            self.assertEqual(got.get(timeout=20), b"first-piece ")
            release.set()
            out, err = p.communicate(timeout=20)
        finally:
            release.set()
            api.close()
        self.assertEqual(p.returncode, 0, err)
        self.assertIn(b"second-piece", out)

    def test_api_errors_are_printed_and_exit_1(self):
        api = FakeApi([(403, {"type": "error", "error": {
            "type": "permission_error", "message": "model calls are not enabled for this sandbox"}})])
        try:
            r = self.run_agent(api, "hi")
        finally:
            api.close()
        self.assertEqual(r.returncode, 1)
        self.assertIn("HTTP 403: model calls are not enabled for this sandbox (permission_error)", r.stderr)

    def test_an_error_event_mid_stream_exits_1(self):
        api = FakeApi([sse([
            {"type": "message_start", "message": {"usage": {}}},
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ])])
        try:
            r = self.run_agent(api, "hi")
        finally:
            api.close()
        self.assertEqual(r.returncode, 1)
        self.assertIn("Overloaded (overloaded_error)", r.stderr)

    def test_an_unreachable_endpoint_exits_1(self):
        api = FakeApi([])
        api.close()
        r = self.run_agent(api, "hi")
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot reach", r.stderr)

    def test_max_turns_stops_the_loop(self):
        api = FakeApi([tool_turn(f"t{i}", "bash", {"command": "true"}) for i in range(5)])
        try:
            r = self.run_agent(api, "--max-turns", "2", "loop")
        finally:
            api.close()
        self.assertEqual(r.returncode, 3)
        self.assertEqual(len(api.requests), 2)
        self.assertIn("--max-turns 2 reached", r.stderr)

    def test_usage(self):
        r = subprocess.run([sys.executable, AGENT, "--help"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        self.assertIn("--max-turns", r.stdout)
        r = subprocess.run([sys.executable, AGENT], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)


if __name__ == "__main__":
    unittest.main()
