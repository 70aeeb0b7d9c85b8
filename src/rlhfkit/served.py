"""Sampling from an OpenAI-compatible server: ``--policy NAME=openai:http://HOST:PORT/v1[#MODEL]`` in
collect and eval (vLLM, SGLang, llama.cpp's server, TGI, ``transformers serve``, or a hosted API).

One request per completion, so that every completion keeps the semantics of the local sampler
(`rlhfkit.generation.sample`):

=====================  ==================================================================================
K per prompt           K requests, each with the completion's own seed (``seed``: the same per-row seed
                       as a local model, `rlhfkit.seeds.row_seed`); ids do not depend on the text, so a
                       completion's id is the same served or local, interrupted or not
temperature, top-p     ``temperature`` (0 = greedy), ``top_p``; ``--top-k`` as ``top_k`` (not in OpenAI's
                       API: vLLM, SGLang and llama.cpp take it, a server that refuses it says so)
--max-new-tokens       ``max_tokens``
--stop                 ``stop``; the text is cut before the first stop string on this side too (servers
                       differ on whether they keep it), and that makes the finish reason ``stop``
finish reason          the server's: ``length`` when it hit ``max_tokens``, anything else is ``stop``
num_tokens             the response's ``usage.completion_tokens`` (0 when the server reports no usage)
logprob                None: servers differ on log-probs; eval reports no KL for a served model
prompts                a message list, or a string prompt with ``--chat-template auto|always``, goes to
                       ``/chat/completions`` (the server applies the model's own chat template); a string
                       with ``--chat-template never`` goes to ``/completions`` as raw text
=====================  ==================================================================================

Reproducibility needs a server that honours a request's ``seed`` for that request alone (vLLM,
SGLang, llama.cpp's server). ``transformers serve`` seeds its global generator when a request
arrives and generates one request at a time, so its samples repeat only with ``--concurrency 1``;
it also samples only when the model's ``generation_config.json`` says ``do_sample: true`` (it reads
temperature and top-p from the request, not whether to sample).

Transport: at most ``concurrency`` requests in flight (a thread each); 429 and 5xx answers and
dropped connections are retried with exponential backoff (honouring ``Retry-After``), other 4xx
answers fail at once with the server's message. Before any sampling `Client.check` asks
``GET /models``: a server that is down, a URL that is not an OpenAI-compatible API and a model
that the server does not serve are one clear line each. ``OPENAI_API_KEY`` (when set) is sent as
the bearer token.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from rlhfkit.config import parse_served_spec
from rlhfkit.errors import RlhfkitError

RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class ServedError(RlhfkitError):
    """A served model that cannot be reached or refuses a request (one line, names the policy)."""


@dataclass(frozen=True)
class Request:
    """One completion to sample: the prompt (text, or a message list) and its own seed."""

    prompt: str | list[dict[str, Any]]
    seed: int


@dataclass(frozen=True)
class Sampled:
    text: str
    finish_reason: str  # "stop" or "length"
    num_tokens: int


@dataclass(frozen=True)
class Sampling:
    """The sampling options every request of a run carries."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    chat_template: str = "auto"  # never: string prompts as raw text (/completions); else the chat endpoint


class Client:
    """One served model: ``openai:http://HOST:PORT/v1`` (the only model it serves) or ``...#MODEL``."""

    def __init__(
        self,
        spec: str,
        *,
        name: str = "",
        label: str = "--policy",
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 0.5,
        api_key: str | None = None,
    ):
        self.label = label
        self.spec = f"{name}={spec}" if name else spec  # as the user wrote it, for messages
        self.base_url, self.model = parse_served_spec(spec)
        self.concurrency = max(1, int(concurrency))
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.requests = 0  # HTTP requests sent, retries included
        self.retried = 0
        self._lock = threading.Lock()

    # --- transport ----------------------------------------------------------------------------

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None, *, retries: int | None = None) -> Any:
        """One JSON request with retries; returns the decoded answer."""
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            with self._lock:
                self.requests += 1
                self.retried += attempt > 0
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            wait_s = self.backoff * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    raw = answer.read()
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in RETRY_STATUS and attempt + 1 < attempts:
                    wait_s = max(wait_s, _retry_after(e))
                    time.sleep(min(wait_s, 60.0))
                    continue
                message = f"{self.label} {self.spec}: {method} {url} answered {e.code} {e.reason}: {detail}"
                raise ServedError(message) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                if attempt + 1 < attempts:
                    time.sleep(min(wait_s, 60.0))
                    continue
                raise ServedError(
                    f"{self.label} {self.spec}: cannot reach {url} ({reason}); is the server running and the URL right?"
                ) from None
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise ServedError(f"{self.label} {self.spec}: {url} did not answer JSON (not an OpenAI API?)") from None
        raise AssertionError("unreachable")

    # --- the model ----------------------------------------------------------------------------

    def served_models(self) -> list[str]:
        answer = self._http("GET", "/models", retries=2)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise ServedError(f"{self.label} {self.spec}: GET {self.base_url}/models is not a model list (not an OpenAI API?)")
        return [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id") is not None]

    def check(self) -> str:
        """Reach the server and settle the model name (before any sampling); returns it."""
        models = self.served_models()
        if self.model is None:
            if len(models) != 1:
                listed = ", ".join(models) or "none"
                message = f"{self.label} {self.spec}: the server serves {len(models)} models ({listed}); name one with #MODEL"
                raise ServedError(message)
            self.model = models[0]
        elif self.model not in models:
            served = ", ".join(models) or "none"
            raise ServedError(f"{self.label} {self.spec}: the server does not serve {self.model!r} (it serves: {served})")
        return self.model

    # --- sampling -----------------------------------------------------------------------------

    def body(self, request: Request, sampling: Sampling) -> tuple[str, dict[str, Any]]:
        """The endpoint and JSON body of one completion (see the module docstring)."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                                "seed": int(request.seed) % (2**31 - 1)}  # fmt: skip
        if sampling.top_p < 1:
            body["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if isinstance(request.prompt, str) and sampling.chat_template == "never":
            return "/completions", {**body, "prompt": request.prompt}
        messages = request.prompt if not isinstance(request.prompt, str) else [{"role": "user", "content": request.prompt}]
        return "/chat/completions", {**body, "messages": list(messages)}

    def sample_one(self, request: Request, sampling: Sampling) -> Sampled:
        path, body = self.body(request, sampling)
        answer = self._http("POST", path, body)
        try:
            choice = answer["choices"][0]
            text = choice["text"] if path == "/completions" else (choice["message"].get("content") or "")
            reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ServedError(f"{self.label} {self.spec}: POST {self.base_url}{path}: no completion in the answer") from None
        usage = answer.get("usage") or {}
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return finish(str(text), reason, int(tokens) if isinstance(tokens, int) else 0, sampling.stop)

    def sample(self, requests: Sequence[Request], sampling: Sampling) -> list[Sampled]:
        """Every request, at most ``concurrency`` in flight; answers in the order of ``requests``.
        The first failure cancels what has not started and is raised."""
        if self.model is None:
            self.check()
        if self.concurrency == 1 or len(requests) <= 1:
            return [self.sample_one(r, sampling) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = [pool.submit(self.sample_one, r, sampling) for r in requests]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                for f in pending:
                    f.cancel()
                raise failed.exception()  # type: ignore[misc]
            return [f.result() for f in futures]


def finish(text: str, reason: Any, num_tokens: int, stop: Sequence[str]) -> Sampled:
    """A served answer with rlhfkit's semantics: the text cut before the first stop string (then
    the finish reason is ``stop``), and the finish reason ``length`` or ``stop``."""
    cut = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cut:
        return Sampled(text[: min(cut)], "stop", num_tokens)
    return Sampled(text, "length" if reason == "length" else "stop", num_tokens)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", errors="replace")
    except Exception:  # a body that cannot be read: the status line says enough
        return ""
    try:
        answer = json.loads(raw)
        if isinstance(answer, dict):
            inner = answer.get("error", answer.get("detail", answer))
            raw = inner.get("message", json.dumps(inner)) if isinstance(inner, dict) else str(inner)
    except json.JSONDecodeError:
        pass
    return " ".join(raw.split())[:300]


def _retry_after(e: urllib.error.HTTPError) -> float:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
