"""Served generation (``--policy NAME=openai:http://HOST:PORT/v1[#MODEL]``).

Against a real ``transformers serve`` process (the ``serve`` extra) started on 127.0.0.1 with the
tiny test model: collect gives what the local path gives (K per prompt, the same stable ids, the
same greedy completions, resume), eval takes a served policy, and a wrong model or a server that
is down is one line. The transport (retries on 429/5xx, the bound on requests in flight, the
model list) is checked against a small OpenAI-shaped HTTP server in a thread of the test, whose
answers the test sets.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import rlhfkit_command, subprocess_env, write_jsonl
from rlhfkit.config import CollectConfig, EvalConfig, named_path, parse_served_spec
from rlhfkit.errors import ConfigError
from rlhfkit.served import Client, Request, Sampling, ServedError, finish

PROMPTS = [
    {"id": "a", "prompt": "Tell me about the cat."},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]},
    {"prompt": "the dog"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the spec and the answer's semantics ----------------------------------------------------------


def test_specs_and_names():
    assert parse_served_spec("openai:http://127.0.0.1:8000/v1/#m") == ("http://127.0.0.1:8000/v1", "m")
    assert parse_served_spec("openai:https://api.example.com/v1") == ("https://api.example.com/v1", None)
    with pytest.raises(ConfigError, match="expected openai:http://HOST:PORT/v1"):
        parse_served_spec("openai:localhost:8000")
    assert named_path("sft=openai:http://h:1/v1#x") == ("sft", "openai:http://h:1/v1#x")
    assert named_path("openai:http://h:1/v1#x") == ("x", "openai:http://h:1/v1#x")
    assert named_path("openai:http://h:1/v1") == ("served", "openai:http://h:1/v1")
    with pytest.raises(ConfigError, match="--concurrency: must be at least 1"):
        CollectConfig(policy=["a=openai:http://h:1/v1"], prompts="p", out="o", concurrency=0).check()
    with pytest.raises(ConfigError, match="--baseline .*must be a local model"):
        EvalConfig(policy=["x"], baseline="openai:http://h:1/v1", prompts="p").check()


def test_finish_cuts_at_the_first_stop_string():
    assert finish("ab. cd! ef", "length", 9, [". ", "!"]) == finish("ab", "stop", 9, [])
    assert finish("abc", "length", 3, ["x"]).finish_reason == "length"
    assert finish("abc", "eos", 3, []).finish_reason == "stop"  # anything but "length" stopped by itself


# --- transport, against an OpenAI-shaped server in a thread -------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    """GET /v1/models; POST /v1/completions answering ``text`` = the prompt reversed, after the
    failures queued in ``server.failures`` (status codes), counting requests in flight."""

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.bodies.append(body)
            status = server.failures.pop(0) if server.failures else 200
            server.in_flight += 1
            server.peak = max(server.peak, server.in_flight)
        time.sleep(server.delay)
        with server.lock:  # before answering: once the answer is out, the client may send the next request
            server.in_flight -= 1
        if status != 200:
            self._send(status, {"error": {"message": f"stub says {status}"}}, {"Retry-After": "0"})
            return
        text = body["prompt"][::-1] if "prompt" in body else body["messages"][-1]["content"].upper()
        choice = {"text": text} if "prompt" in body else {"message": {"role": "assistant", "content": text}}
        self._send(200, {"choices": [{**choice, "index": 0, "finish_reason": "length"}],
                         "usage": {"completion_tokens": len(text), "prompt_tokens": 1}})  # fmt: skip


@pytest.fixture()
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.models, server.failures, server.bodies = ["m1"], [], []
    server.lock, server.in_flight, server.peak, server.delay = threading.Lock(), 0, 0, 0.0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"openai:http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_requests_carry_the_options_and_answers_keep_their_order(stub):
    server, spec = stub
    client = Client(spec, concurrency=4, backoff=0.01)
    assert client.check() == "m1"  # the only model served
    options = Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3, stop=("zz",), chat_template="never")
    answers = client.sample([Request(f"p{i}", seed=2**40 + i) for i in range(10)], options)
    assert [a.text for a in answers] == [f"p{i}"[::-1] for i in range(10)]
    assert all(a.finish_reason == "length" and a.num_tokens == 2 for a in answers)
    body = server.bodies[0]
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p", "top_k", "stop")} == {
        "model": "m1", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 3, "stop": ["zz"]}  # fmt: skip
    assert sorted(b["seed"] for b in server.bodies) == [(2**40 + i) % (2**31 - 1) for i in range(10)]
    chat = client.sample([Request([{"role": "user", "content": "hi"}], 1), Request("yo", 2)], Sampling(max_new_tokens=3))
    assert [a.text for a in chat] == ["HI", "YO"]  # a message list and (chat template auto) a string: the chat endpoint
    last_two = server.bodies[-2:]  # sent concurrently: in either order
    assert {"role": "user", "content": "yo"} in [m for body in last_two for m in body["messages"]]
    assert not any("prompt" in body for body in last_two)


def test_retries_on_429_and_5xx_then_fails_clearly_on_other_errors(stub):
    server, spec = stub
    client = Client(spec, concurrency=1, backoff=0.01, retries=3)
    server.failures = [429, 503, 500]
    assert client.sample([Request("abc", 1)], Sampling(max_new_tokens=3, chat_template="never"))[0].text == "cba"
    assert client.retried == 3
    server.failures = [503] * 4  # one more than the retries
    with pytest.raises(ServedError, match="answered 503 .*stub says 503"):
        client.sample([Request("abc", 1)], Sampling(max_new_tokens=3, chat_template="never"))
    server.failures = [422]  # a request the server refuses is not retried
    before = client.requests
    with pytest.raises(ServedError, match="answered 422"):
        client.sample([Request("abc", 1)], Sampling(max_new_tokens=3, chat_template="never"))
    assert client.requests == before + 1


def test_at_most_concurrency_requests_in_flight(stub):
    server, spec = stub
    server.delay = 0.05
    Client(spec, concurrency=3).sample([Request(str(i), i) for i in range(12)], Sampling(max_new_tokens=1, chat_template="never"))
    assert server.peak == 3


def test_the_model_must_be_served_and_the_server_up(stub):
    server, spec = stub
    with pytest.raises(ServedError, match=r"does not serve 'm2' \(it serves: m1\)"):
        Client(spec + "#m2").check()
    server.models = ["m1", "m2"]
    with pytest.raises(ServedError, match=r"serves 2 models \(m1, m2\); name one with #MODEL"):
        Client(spec).check()
    assert Client(spec + "#m2").check() == "m2"
    with pytest.raises(ServedError, match="cannot reach .* is the server running"):
        Client(f"openai:http://127.0.0.1:{_free_port()}/v1", backoff=0.01).check()


# --- a real transformers serve -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """The tiny test model, with ``do_sample: true`` in generation_config.json (transformers serve
    samples only then; with temperature 0 it decodes greedily)."""
    from rlhfkit.testing import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-served")
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))
    return path


@pytest.fixture(scope="module")
def server(served_model):
    """``transformers serve MODEL`` on 127.0.0.1 (a process of its own); yields the policy spec."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no transformers CLI next to this interpreter")
    port = _free_port()
    log = served_model.parent / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "serve", str(served_model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.25)
        yield f"openai:http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def collect(cli, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)

    def run(out, policy, *args, expect_ok=True):
        base = ("--prompts", prompts, "--out", out, "--k", "2", "--max-new-tokens", "6")
        result = cli("collect", "--policy", policy, *base, *args)
        if not expect_ok:
            return result
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout), [json.loads(line) for line in Path(out).read_text().splitlines()]

    return run


def _completions(lines):
    fields = ("id", "text", "finish_reason", "num_tokens")
    return [(line["prompt_id"], *(c[f] for f in fields)) for line in lines for c in line["completions"]]


@pytest.mark.slow  # starts transformers serve (~10 s)
@pytest.mark.parametrize("template", ["auto", "never"])  # the chat endpoint, and raw text on /completions
def test_greedy_served_completions_are_the_local_ones(collect, server, served_model, tmp_path, template):
    """K per prompt, the same ids, texts, finish reasons and token counts as the local model."""
    args = ("--temperature", "0", "--chat-template", template)
    local, local_lines = collect(tmp_path / "local.jsonl", f"tiny={served_model}", *args)
    served, served_lines = collect(tmp_path / "served.jsonl", f"tiny={server}", *args, "--concurrency", "3")
    assert _completions(served_lines) == _completions(local_lines)
    assert served["completions"] == 6 and all(len(line["completions"]) == 2 for line in served_lines)
    assert served["tokens"] == local["tokens"] > 0 and served["finish_reason"] == local["finish_reason"]
    assert all(c["logprob"] is None for line in served_lines for c in line["completions"])  # servers differ on log-probs


@pytest.mark.slow
def test_sampled_collect_is_reproducible_and_resumes(collect, server, tmp_path):
    """With one request in flight (transformers serve seeds its global generator per request) the
    same seed gives the same file; a run killed mid-line resumes to that file."""
    policy = f"tiny={server}"
    one = ("--concurrency", "1", "--max-new-tokens", "8", "--chat-template", "never")
    _, lines = collect(tmp_path / "a.jsonl", policy, *one)
    collect(tmp_path / "b.jsonl", policy, *one)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    texts = [c["text"] for line in lines for c in line["completions"]]
    assert len(set(texts)) > 1  # sampled, not greedy
    _, other = collect(tmp_path / "c.jsonl", policy, *one, "--seed", "1")
    assert [c["text"] for line in other for c in line["completions"]] != texts
    # killed while writing its second line: the partial file holds one line and a half
    out = tmp_path / "resumed.jsonl"
    full = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / ".resumed.jsonl.partial").write_text(full[0] + "\n" + full[1][:40])
    result, _ = collect(out, policy, *one)
    assert (result["resumed"], result["collected"]) == (1, 2)
    assert out.read_bytes() == (tmp_path / "a.jsonl").read_bytes()


@pytest.mark.slow
def test_wrong_model_and_down_server_are_one_line_and_write_nothing(collect, server, tmp_path):
    for policy, message in [(f"x={server}#no-such-model", "does not serve 'no-such-model'"),
                            (f"x=openai:http://127.0.0.1:{_free_port()}/v1", "cannot reach")]:  # fmt: skip
        result = collect(tmp_path / "x.jsonl", policy, expect_ok=False)
        assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not list(tmp_path.glob("*x.jsonl*"))


@pytest.mark.slow
def test_eval_takes_a_served_policy(server, served_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    run = subprocess.run(rlhfkit_command("eval", "--baseline", f"base={served_model}", "--policy", f"srv={server}",
                                         "--prompts", prompts, "--rm", "python:examples/scripted_rewards.py:letter_e_count",
                                         "--max-new-tokens", "6", "--out", tmp_path / "eval"),
                         env=subprocess_env(), capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    served = [c for line in samples for c in line["completions"] if c.get("policy") == "srv"]
    assert len(served) == len(PROMPTS) and all(c["finish_reason"] in ("stop", "length") for c in served)
    assert "srv" in json.dumps(json.loads(run.stdout))
