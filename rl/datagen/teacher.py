"""A client for a teacher LLM behind any OpenAI-compatible ``/chat/completions`` endpoint.

What it does per call (:meth:`TeacherClient.chat`):

1. look the call up in an on-disk cache keyed by the SHA-256 of the model
   name, the messages and the sampling parameters (never the endpoint's key
   or address), so a re-run costs no request;
2. otherwise POST it (at most ``concurrency`` requests in flight across all
   threads), retrying timeouts, connection errors, HTTP 408/409/429 and 5xx
   with exponential backoff (``backoff_s * 2**attempt``, capped at
   ``max_backoff_s``, times a random factor in [1, 1.25), and at least the
   server's ``Retry-After``), up to ``max_retries`` retries;
3. cache the reply text and return it.

Errors: HTTP 401/403/404 mean a wrong key, model or address; they raise
:class:`TeacherConfigError`, which stops the whole run. Any other failure of
one call (another 4xx such as a prompt longer than the model's context,
retries exhausted, a body that is not a chat completion) raises
:class:`TeacherCallError`, which drops only the trace being rewritten.

Secrets: the API key is read from the environment variable named by
``api_key_env``, stripped of surrounding whitespace (a key mounted from a file
ends with a newline) and refused, without being shown, when whitespace, control
or non-ASCII characters remain inside it. It is used only in the
``Authorization`` header. Credentials in ``base_url`` (``user:password@`` and
query values, which are sent as request parameters) are secrets too. No secret
is part of the cache key, the cache files, the stats or any message: error
texts and replies are scrubbed (:meth:`TeacherClient.scrub`) of every form a
secret can take in them (as is, so also after ``Bearer ``, URL-encoded,
JSON-escaped, and ``user:password`` in Base64), and the address is shown as
:func:`redact_url` writes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit, urlunsplit

import httpx

from rollout.config import check_ranges

RETRY_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})


@dataclass
class TeacherConfig:
    """Where the teacher is, how it is called, and where its replies are cached."""

    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={
        "help": "OpenAI-compatible API root, up to and including /v1 (a local vLLM server or a hosted API)"})
    model: str = field(default="", metadata={"help": "model name the endpoint serves (required for the teacher)"})
    api_key_env: str | None = field(default=None, metadata={
        "help": "name of the environment variable holding the API key (null: send no key, e.g. a local server)"})
    concurrency: int = field(default=4, metadata={"help": "most requests in flight at once (count)", "range": ">= 1"})
    max_retries: int = field(default=5, metadata={
        "help": "retries of one call after a retryable failure (count)", "range": ">= 0"})
    backoff_s: float = field(default=1.0, metadata={
        "help": "first retry delay; doubles on each retry (seconds)", "range": ">= 0"})
    max_backoff_s: float = field(default=60.0, metadata={"help": "longest retry delay (seconds)", "range": ">= 0"})
    timeout_s: float = field(default=300.0, metadata={
        "help": "time limit of one HTTP request (seconds)", "range": "> 0"})
    max_tokens: int = field(default=2048, metadata={"help": "reply length limit of one call (tokens)", "range": ">= 1"})
    max_tokens_param: str = field(default="max_tokens", metadata={
        "help": "request field for the reply length limit (some hosted APIs want 'max_completion_tokens')"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature of the teacher", "range": ">= 0"})
    seed: int | None = field(default=0, metadata={
        "help": "sampling seed sent with each call (null: none)", "range": ">= 0"})
    cache_dir: str | None = field(default="runs/datagen/teacher_cache", metadata={
        "help": "folder of cached replies (null: no cache)"})
    preflight: bool = field(default=True, metadata={
        "help": "before the run, GET /models to check the address, the key and that the model is served"})

    def __post_init__(self) -> None:
        check_ranges(self)


class TeacherConfigError(RuntimeError):
    """The endpoint refuses every call (wrong address, key or model): stop the run."""


class TeacherCallError(RuntimeError):
    """One call failed for good; the trace that needed it is dropped."""


@dataclass
class Reply:
    """The teacher's reply text, why it stopped (``stop``, ``length``, ...), and whether it came from the cache."""

    content: str
    finish_reason: str | None
    cached: bool


@dataclass
class TeacherStats:
    """Counts since the client was made: requests sent, cache hits, retries, calls that failed."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failed_calls: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def read_api_key(env_name: str | None) -> str | None:
    """The key in environment variable ``env_name``, stripped; None without a name.

    Raises TeacherConfigError when the variable is unset or empty, or when the
    key holds anything but printable ASCII (spaces, newlines, control or
    non-ASCII characters); the message never shows the key.
    """
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise TeacherConfigError(f"environment variable {env_name} (teacher.api_key_env) is not set or empty")
    if not all("!" <= c <= "~" for c in key):
        raise TeacherConfigError(f"environment variable {env_name} (teacher.api_key_env) holds a key of {len(key)} "
                                 "characters with whitespace, control or non-ASCII characters inside it (not shown); "
                                 "an API key is one word of printable ASCII")
    return key


def redact_url(url: str) -> str:
    """``url`` without its secrets: user information, query values and fragment become ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = "***@" + parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{name}=***" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, "***" if parts.fragment else ""))


def url_secrets(url: str) -> list[str]:
    """The secrets ``url`` may carry: user name, password, ``user:password``, query values, fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    userinfo = parts.netloc.rpartition("@")[0]
    found = [userinfo, *userinfo.split(":", 1), parts.fragment]
    found += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    return [unquote(x) for x in found if x]


def secret_forms(secret: str) -> set[str]:
    """Every form in which ``secret`` can appear in a message or a reply."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    if ":" in secret:  # user:password, as in an HTTP Basic Authorization header
        forms.add(base64.b64encode(secret.encode()).decode())
    return {f for f in forms if f}


def cache_key(model: str, messages: list[dict], params: dict[str, Any]) -> str:
    """SHA-256 of the call's model, messages and sampling parameters (canonical JSON)."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CallCache:
    """Replies on disk, one JSON file per call at ``dir/ab/abcdef....json``; writes are atomic."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # a file cut by a crash mid-write cannot happen (atomic writes); treat damage as a miss

    def put(self, key: str, entry: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False)
        os.replace(tmp, path)


class TeacherClient:
    """Calls one teacher model; see the module docstring. Thread-safe; use as a context manager."""

    def __init__(self, cfg: TeacherConfig, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        if not cfg.model:
            raise TeacherConfigError("teacher.model is empty: name the model the endpoint serves")
        self.cfg = cfg
        self._key = read_api_key(cfg.api_key_env)
        secrets = url_secrets(cfg.base_url) + ([self._key] if self._key else [])
        self._secrets = sorted({f for s in secrets for f in secret_forms(s)}, key=len, reverse=True)
        self.address = redact_url(cfg.base_url)  # what messages show
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        root = urlsplit(cfg.base_url)  # query values go with every request; httpx would append paths after them
        params = parse_qsl(root.query, keep_blank_values=True)
        root_url = urlunsplit((root.scheme, root.netloc, root.path.rstrip("/") + "/", "", ""))
        self._http = httpx.Client(base_url=root_url, params=params, headers=headers, timeout=cfg.timeout_s,
                                  transport=transport)
        self._slots = threading.BoundedSemaphore(cfg.concurrency)
        self._lock = threading.Lock()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.cache = CallCache(cfg.cache_dir) if cfg.cache_dir else None
        self.stats = TeacherStats()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def scrub(self, text: str) -> str:
        """``text`` with every form of every secret (key, credentials in ``base_url``) replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def params(self) -> dict[str, Any]:
        """The sampling parameters sent with every call (part of the cache key)."""
        out: dict[str, Any] = {self.cfg.max_tokens_param: self.cfg.max_tokens, "temperature": self.cfg.temperature}
        if self.cfg.seed is not None:
            out["seed"] = self.cfg.seed
        return out

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        wait = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt) * (1 + 0.25 * self._rng.random())
        if retry_after:
            try:
                wait = max(wait, min(float(retry_after), self.cfg.max_backoff_s))
            except ValueError:
                pass  # an HTTP date: keep our own delay
        return wait

    # ------------------------------------------------------------------ calls

    def preflight(self) -> list[str]:
        """GET ``/models``; the served model names. Raises TeacherConfigError when the endpoint is unusable."""
        try:
            resp = self._http.get("models")
        except httpx.HTTPError as e:
            raise TeacherConfigError(f"teacher endpoint {self.address} unreachable: "
                                     f"{self.scrub(f'{type(e).__name__}: {e}')}") from None
        if resp.status_code != 200:
            raise TeacherConfigError(f"teacher {self.address}: GET models: HTTP {resp.status_code}: "
                                     f"{self.scrub(resp.text)[:300]}")
        try:
            names = [m["id"] for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise TeacherConfigError(f"teacher {self.address}: GET models: not an OpenAI model list") from None
        if self.cfg.model not in names:
            raise TeacherConfigError(self.scrub(f"the endpoint does not serve model {self.cfg.model!r}; it serves: "
                                                f"{', '.join(map(str, names[:20])) or 'nothing'}"))
        return names

    def chat(self, messages: list[dict]) -> Reply:
        """The teacher's reply to ``messages`` (cached; retried; see the module docstring)."""
        params = self.params()
        key = cache_key(self.cfg.model, messages, params)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count("cache_hits")
            return Reply(hit["content"], hit.get("finish_reason"), cached=True)
        body = {"model": self.cfg.model, "messages": messages, **params}
        reply = self._post(body)  # scrubbed: a reply that echoes a secret is never cached or returned with it
        if self.cache is not None:
            self.cache.put(key, {"model": self.cfg.model, "messages": messages, "params": params,
                                 "content": reply.content, "finish_reason": reply.finish_reason})
        return reply

    def _post(self, body: dict) -> Reply:
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count("retries")
            retry_after = None
            try:
                with self._slots:
                    self._count("requests")
                    resp = self._http.post("chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = self.scrub(f"{type(e).__name__}: {e}")
            else:
                if resp.status_code == 200:
                    return self._reply(resp)
                last = f"HTTP {resp.status_code}: {self.scrub(resp.text)[:300]}"  # scrubbed before cut
                if resp.status_code in FATAL_STATUS:
                    raise TeacherConfigError(f"teacher {self.address} refused the call: {last}")
                if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                    self._count("failed_calls")
                    raise TeacherCallError(last)
                retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                self._sleep(self.delay(attempt, retry_after))
        self._count("failed_calls")
        raise TeacherCallError(f"gave up after {self.cfg.max_retries + 1} attempts; last: {last}")

    def _reply(self, resp: httpx.Response) -> Reply:
        try:
            choice = resp.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            self._count("failed_calls")
            raise TeacherCallError(f"not a chat completion: {self.scrub(resp.text)[:200]}") from None
        return Reply(self.scrub(content) if isinstance(content, str) else "", choice.get("finish_reason"),
                     cached=False)
