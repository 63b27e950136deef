r"""Reward models (registered in `REWARD_MODELS`): scorers that model-based rewards compose.

A scorer scores N (prompt, completion) pairs at once: ``score(prompts, completions,
**columns) -> Tensor[N, K]`` (float32 on the CPU, K heads, NaN where it could not score).
Three kinds, named by `kind` in a reward's parameters (`rewards/model_rewards.py`):

- ``classifier``: an HF ``AutoModelForSequenceClassification`` and its tokenizer; its
  ``num_labels`` logits are the K heads (a reward model has one; a multi-aspect one K).
- ``pairwise``: a judge of P(a ≻ b | prompt), ``prefer(prompts, a, b) -> Tensor[M]``.
  ``mode: bradley_terry`` (default) reads a classifier reward model r and gives
  σ((r(x, a) − r(x, b)) / T), the Bradley–Terry probability a pointwise RM is trained for;
  each completion is scored once (G forwards for a group, not G(G − 1)/2), and
  P(a ≻ b) + P(b ≻ a) = 1 exactly. ``mode: joint`` feeds the pair as one text
  (``template`` with {prompt}, {a}, {b}) to a classifier trained on such texts: one label
  gives σ(logit / T), two or more the softmax of ``preferred_label``; ``both_orders``
  (default) averages p(a, b) and 1 − p(b, a), so the order of the pair cannot matter.
- ``generative``: an LLM judge behind an OpenAI-compatible HTTP server (vLLM, SGLang, TGI,
  llama.cpp, a hosted API): ``template`` -> POST ``{base_url}/chat/completions`` (or
  ``/completions``) -> the reply's score (`parse_judge_reply`). Standard library only
  (urllib, a thread pool): a per-request ``timeout``, ``retries`` with exponential back-off
  on connection errors, timeouts, HTTP 429 and 5xx, at most ``concurrency`` requests at a
  time. A 4xx answer (wrong model name, key or endpoint) fails at once, naming the key.

Every kind is batched (``batch_size`` rows per forward, shortest texts together), runs under
``torch.no_grad``, and keeps a bounded LRU cache (``cache_size`` entries, 0: none) of what
it computed, keyed by the text the model saw (a function of (prompt, completion)), so a
completion scored again (an ensemble member shared by two rewards, a refill round, the same
answer sampled twice) costs nothing. Models load from a local directory through
``from_pretrained``; a hub id goes the same way (transformers' own cache and download rules;
nothing here fetches anything itself). The weights load on the first call, not when the
run's rewards are built: a reward with a ``timeout`` runs in a forked worker
(`rewards/worker.py`), which must load its own copy. Several scorers naming the same
model (path, device, dtype, max_length) in one process share one loaded copy.

Where they run: a reward with a model should be configured with ``timeout: 0`` so it runs
in the trainer's process: there it may use the GPU (``device: auto`` picks CUDA when
visible, ``cuda:1`` a second one) and loads once per run. With a timeout (the default,
30 s) it runs in the reward worker, where CUDA is hidden (``device: auto`` is the CPU and
``device: cuda`` fails naming the key), the first call must load the model within the
deadline, and a worker replaced after a timeout or a crash loads it again. The HTTP judge
holds no weights, so the worker (and its deadline over all of a call's requests) suits it.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from grouprl.registry import Registry, did_you_mean

__all__ = [
    "REWARD_MODELS",
    "ClassifierScorer",
    "GenerativeScorer",
    "LRUCache",
    "PairwiseScorer",
    "Scorer",
    "ScorerError",
    "bradley_terry_prob",
    "build_scorer",
    "build_tiny_classifier",
    "parse_judge_reply",
    "prompt_text",
    "train_bradley_terry",
]

REWARD_MODELS: Registry[Any] = Registry("reward model")
DEFAULT_CACHE_SIZE = 4096
PARSE_MODES = ("number", "json", "regex")
ENDPOINTS = ("chat", "completions")
PAIRWISE_MODES = ("bradley_terry", "joint")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_PAIR_TEMPLATE = "{prompt}\n[A]\n{a}\n[B]\n{b}"
DEFAULT_JUDGE_TEMPLATE = (
    "Rate the response to the question below from 0 to 10, where 10 is a fully correct, "
    "helpful answer.\n\nQuestion:\n{prompt}\n\nResponse:\n{completion}\n\n"
    "Explain briefly, then end with one line 'Score: <number>'."
)


class ScorerError(RuntimeError):
    """A scorer could not score a batch: the model did not load, the server refused, ..."""


@runtime_checkable
class Scorer(Protocol):
    """What rewards use of a scorer: K heads, and a batched score with NaN where it cannot."""

    kind: str
    where: str

    @property
    def num_heads(self) -> int: ...

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> torch.Tensor:
        """Tensor[N, K] float32 on the CPU."""
        ...


# ---------------------------------------------------------------- small helpers


class LRUCache:
    """A bounded mapping that forgets its least recently used entry first (``maxsize`` 0:
    stores nothing). Thread-safe; counts hits and misses."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = int(maxsize)
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as chat messages: a conversational prompt's own, else one user message."""
    if isinstance(prompt, (list, tuple)):
        return [
            {"role": str(m.get("role", "user")), "content": _text(m.get("content"))}
            for m in prompt
            if isinstance(m, dict)
        ]
    return [{"role": "user", "content": _text(prompt)}]


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: the string itself, or its messages' contents joined by newlines."""
    if isinstance(prompt, (list, tuple)):
        return "\n".join(m["content"] for m in prompt_messages(prompt))
    return _text(prompt)


def _completion_text(completion: Any) -> str:
    from grouprl.rewards.base import completion_text

    return completion_text(completion)


def _int(value: Any, where: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: must be an integer >= {low}, got {value!r}")
    return value


def _number(value: Any, where: str, *, low: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{where}: must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _choice(value: Any, choices: Sequence[str], where: str) -> str:
    if value not in choices:
        raise ValueError(
            f"{where}: must be one of {', '.join(choices)}, got {value!r}"
            f"{did_you_mean(str(value), list(choices))}"
        )
    return value


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _check_path(path: Any, where: str) -> str:
    """A model directory that exists (with a config.json), or something shaped like a hub id
    ("name" or "org/name") that is left to `from_pretrained`."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(
            f"{where}.path: required: a local model directory (or a hub id), got {path!r}"
        )
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ValueError(f"{where}.path: no model at {path} (no config.json there)")
        return str(local)
    if not _HUB_ID.fullmatch(path):
        raise ValueError(f"{where}.path: no model at {path}")
    return path  # a hub id


def _cuda_visible() -> bool:
    # the reward worker hides CUDA by emptying CUDA_VISIBLE_DEVICES after the fork, when
    # torch may already have cached that CUDA is available
    return torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def resolve_device(name: str, where: str) -> torch.device:
    """``auto``: CUDA when visible, else the CPU; ``cuda``/``cuda:N`` must be visible."""
    if name == "auto":
        return torch.device("cuda" if _cuda_visible() else "cpu")
    if name.startswith("cuda") and not _cuda_visible():
        raise ScorerError(
            f"{where}.device: {name!r} but CUDA is not available here (a reward with a "
            f"timeout runs in a forked worker without CUDA: give this reward timeout: 0)"
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it, float32 elsewhere."""
    if name == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _template_fields(template: Any, where: str, allowed: Sequence[str] | None = None) -> list[str]:
    """The {names} of a str.format template (literal braces are doubled: {{ }})."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"{where}: must be a non-empty string, got {template!r}")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(
            f"{where}: not a valid template ({e}); write literal braces as {{{{ }}}}"
        ) from None
    for f in names:
        if not f.isidentifier():
            raise ValueError(
                f"{where}: placeholder {{{f}}} must be a plain name ({{prompt}}, {{completion}} "
                f"or a dataset column); write literal braces as {{{{ }}}}"
            )
        if allowed is not None and f not in allowed:
            raise ValueError(
                f"{where}: unknown placeholder {{{f}}}{did_you_mean(f, list(allowed))}; "
                f"known: {', '.join('{' + a + '}' for a in allowed)}"
            )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- sequence classifiers


class _ClassifierEngine:
    """One sequence classifier loaded in this process (on first use), with its LRU cache of
    logits keyed by the exact text it saw; shared by the scorers that name the same model."""

    def __init__(
        self,
        *,
        path: str,
        device: str,
        dtype: str,
        max_length: int,
        trust_remote_code: bool,
        cache_size: int,
    ) -> None:
        self.path, self.device_name, self.dtype_name = path, device, dtype
        self.max_length, self.trust_remote_code = max_length, trust_remote_code
        self.cache = LRUCache(cache_size)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: torch.device | None = None
        self._lock = threading.Lock()

    def load(self, where: str) -> None:
        """Load the tokenizer and the model once (errors name `where`'s keys)."""
        with self._lock:
            if self.model is not None:
                return
            device = resolve_device(self.device_name, where)
            dtype = resolve_dtype(self.dtype_name, device)
            from transformers import AutoModelForSequenceClassification

            from grouprl.models.loading import load_tokenizer

            try:
                tok = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.path, dtype=dtype, trust_remote_code=self.trust_remote_code
                )
            except Exception as e:
                raise ScorerError(
                    f"{where}.path: cannot load a sequence classifier from {self.path}: "
                    f"{type(e).__name__}: {e}"
                ) from None
            # right padding keeps every real token at its unpadded position, so a text's
            # score does not depend on what it is batched with; the classifier pools the
            # last token that is not the pad token (left or right padding alike)
            tok.padding_side = "right"
            tok.truncation_side = "left"  # an over-long text keeps its end (the completion)
            config = (
                model.config.get_text_config()
                if hasattr(model.config, "get_text_config")
                else model.config
            )
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = tok.pad_token_id
                model.config.pad_token_id = tok.pad_token_id
            model.to(device).eval()
            self.tokenizer, self.device, self.model = tok, device, model

    def num_labels(self, where: str) -> int:
        self.load(where)
        return int(self.model.config.num_labels)

    def logits(
        self, texts: Sequence[str], *, special_tokens: bool, batch_size: int, where: str
    ) -> torch.Tensor:
        """Tensor[M, K] float32 (CPU): the classifier's logits for each text, batched."""
        self.load(where)
        keys = [(special_tokens, t) for t in texts]
        found: dict[tuple[bool, str], torch.Tensor] = {}
        todo: list[tuple[bool, str]] = []
        for key in dict.fromkeys(keys):
            hit = self.cache.get(key)
            if hit is None:
                todo.append(key)
            else:
                found[key] = hit
        todo.sort(key=lambda k: len(k[1]))  # similar lengths share a batch: less padding
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                enc = self.tokenizer(
                    [t for _, t in chunk],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=special_tokens,
                )
                enc = {
                    k: v.to(self.device)
                    for k, v in enc.items()
                    if k in ("input_ids", "attention_mask")
                }
                out = self.model(**enc).logits.float().cpu()
                for key, row in zip(chunk, out, strict=True):
                    found[key] = row
                    self.cache.put(key, row)
        if not keys:
            return torch.zeros(0, self.num_labels(where))
        return torch.stack([found[k] for k in keys])


_ENGINES: weakref.WeakValueDictionary[tuple, _ClassifierEngine] = weakref.WeakValueDictionary()
_ENGINES_LOCK = threading.Lock()


def _shared_engine(**kw: Any) -> _ClassifierEngine:
    key = tuple(sorted(kw.items()))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ClassifierEngine(**kw)
            _ENGINES[key] = engine
        return engine


class _ClassifierBase:
    """Parameters and the shared engine of the classifier-backed kinds."""

    def __init__(
        self,
        *,
        path: str,
        batch_size: int,
        max_length: int,
        device: str,
        dtype: str,
        chat_template: bool | str,
        separator: str,
        cache_size: int,
        trust_remote_code: bool,
        where: str,
    ) -> None:
        self.where = where
        self.path = _check_path(path, where)
        self.batch_size = _int(batch_size, f"{where}.batch_size", low=1)
        max_length = _int(max_length, f"{where}.max_length", low=1)
        if not isinstance(device, str) or not (
            device in ("auto", "cpu") or device.startswith(("cuda", "mps", "xpu"))
        ):
            raise ValueError(f"{where}.device: auto, cpu, cuda or cuda:N, got {device!r}")
        dtype = _choice(dtype, DTYPE_NAMES, f"{where}.dtype")
        if chat_template not in ("auto", True, False):
            raise ValueError(f"{where}.chat_template: auto, true or false, got {chat_template!r}")
        self.chat_template = chat_template
        if not isinstance(separator, str):
            raise ValueError(f"{where}.separator: must be a string, got {separator!r}")
        self.separator = separator
        cache_size = _int(cache_size, f"{where}.cache_size", low=0)
        self.engine = _shared_engine(
            path=self.path,
            device=device,
            dtype=dtype,
            max_length=max_length,
            trust_remote_code=bool(trust_remote_code),
            cache_size=cache_size,
        )

    @property
    def num_heads(self) -> int:
        return self.engine.num_labels(self.where)

    def _logits(self, texts: Sequence[str], special_tokens: bool) -> torch.Tensor:
        return self.engine.logits(
            texts, special_tokens=special_tokens, batch_size=self.batch_size, where=self.where
        )

    def _uses_chat_template(self) -> bool:
        self.engine.load(self.where)
        has = getattr(self.engine.tokenizer, "chat_template", None) is not None
        if self.chat_template is True and not has:
            raise ScorerError(
                f"{self.where}.chat_template: true, but the tokenizer at {self.path} has no chat "
                f"template (set chat_template: false to score prompt + separator + completion)"
            )
        return has if self.chat_template == "auto" else bool(self.chat_template)

    def render(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], bool]:
        """The texts the classifier sees, and whether the tokenizer adds its special tokens:
        the chat template over the prompt's messages and the completion as the assistant's
        turn, else prompt text + `separator` + completion text."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"{self.where}: {len(prompts)} prompts for {len(completions)} completions"
            )
        if self._uses_chat_template():
            tok = self.engine.tokenizer
            texts = [
                tok.apply_chat_template(
                    prompt_messages(p) + [{"role": "assistant", "content": _completion_text(c)}],
                    tokenize=False,
                )
                for p, c in zip(prompts, completions, strict=True)
            ]
            return texts, False  # the template already holds the special tokens
        texts = [
            prompt_text(p) + self.separator + _completion_text(c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        return texts, True


@REWARD_MODELS.register("classifier")
class ClassifierScorer(_ClassifierBase):
    """A sequence classifier (HF ``AutoModelForSequenceClassification``): its K logits per
    (prompt, completion) are the K heads.

    ``score`` gives Tensor[N, K]. path: a local model directory (or a hub id); batch_size: rows per forward (16);
    max_length: tokens kept per text, cut from the left (2048); device: auto (CUDA when
    visible, else CPU), cpu, cuda or cuda:N; dtype: auto (bf16 on a GPU, else fp32),
    float32, bfloat16 or float16; chat_template: auto (use the tokenizer's when it has
    one), true or false (then prompt + `separator` + completion); cache_size: cached rows
    (4096, 0: none); trust_remote_code: for models with their own code.
    """

    kind = "classifier"

    def __init__(
        self,
        where: str = "reward_model",
        /,
        *,
        path: str,
        batch_size: int = 16,
        max_length: int = 2048,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: bool | str = "auto",
        separator: str = "",
        cache_size: int = DEFAULT_CACHE_SIZE,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(
            path=path,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            dtype=dtype,
            chat_template=chat_template,
            separator=separator,
            cache_size=cache_size,
            trust_remote_code=trust_remote_code,
            where=where,
        )

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> torch.Tensor:
        texts, special = self.render(prompts, completions)
        return self._logits(texts, special)


def bradley_terry_prob(
    score_a_M: torch.Tensor, score_b_M: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """P(a ≻ b) = σ((r_a − r_b) / T): the Bradley–Terry preference model a pointwise reward
    model is trained for (Ouyang et al., "Training language models to follow instructions
    with human feedback", arXiv 2203.02155, eq. 1). P(a ≻ b) + P(b ≻ a) = 1 exactly."""
    return torch.sigmoid((score_a_M.double() - score_b_M.double()) / temperature).float()


@REWARD_MODELS.register("pairwise")
class PairwiseScorer(_ClassifierBase):
    """A pairwise judge, P(a ≻ b | prompt): Bradley–Terry over a classifier reward model, or a
    classifier over the pair's text.

    ``prefer(prompts, a, b) -> Tensor[M]``. mode: ``bradley_terry`` (default): σ((r(x, a) − r(x, b)) / `temperature`) from head
    `head` of a classifier reward model (`bradley_terry_prob`), each completion scored once;
    ``joint``: a classifier over the pair text `template` ({prompt}, {a}, {b}); one label:
    σ(logit / T); two or more: softmax(logits / T)[`preferred_label`]; `both_orders`
    (default true) averages p(a, b) and 1 − p(b, a). The classifier parameters are those of
    the ``classifier`` kind (the pair text is always plain text, no chat template, in
    ``joint`` mode). ``score`` gives the pointwise heads in ``bradley_terry`` mode only.
    """

    kind = "pairwise"

    def __init__(
        self,
        where: str = "reward_model",
        /,
        *,
        path: str,
        mode: str = "bradley_terry",
        head: int = 0,
        temperature: float = 1.0,
        template: str = DEFAULT_PAIR_TEMPLATE,
        both_orders: bool = True,
        preferred_label: int = 0,
        batch_size: int = 16,
        max_length: int = 2048,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: bool | str = "auto",
        separator: str = "",
        cache_size: int = DEFAULT_CACHE_SIZE,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(
            path=path,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            dtype=dtype,
            chat_template=chat_template,
            separator=separator,
            cache_size=cache_size,
            trust_remote_code=trust_remote_code,
            where=where,
        )
        self.mode = _choice(mode, PAIRWISE_MODES, f"{where}.mode")
        self.head = _int(head, f"{where}.head", low=0)
        self.temperature = _number(temperature, f"{where}.temperature", low=0.0, strict=True)
        _template_fields(template, f"{where}.template", allowed=("prompt", "a", "b"))
        self.template = template
        self.both_orders = bool(both_orders)
        self.preferred_label = _int(preferred_label, f"{where}.preferred_label", low=0)

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> torch.Tensor:
        if self.mode != "bradley_terry":
            raise ScorerError(f"{self.where}.mode: a joint pairwise judge has no pointwise score")
        texts, special = self.render(prompts, completions)
        return self._logits(texts, special)

    def _head(self, scores_MK: torch.Tensor) -> torch.Tensor:
        if self.head >= scores_MK.shape[1]:
            raise ScorerError(
                f"{self.where}.head: {self.head}, but the model at {self.path} has {scores_MK.shape[1]} heads"
            )
        return scores_MK[:, self.head]

    def _joint(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        texts = [
            self.template.format(prompt=prompt_text(p), a=x, b=y)
            for p, x, y in zip(prompts, a, b, strict=True)
        ]
        logits_MK = self._logits(texts, True)
        k = logits_MK.shape[1]
        if k == 1:
            return torch.sigmoid(logits_MK[:, 0].double() / self.temperature).float()
        if self.preferred_label >= k:
            raise ScorerError(
                f"{self.where}.preferred_label: {self.preferred_label}, but the model at {self.path} has {k} labels"
            )
        return torch.softmax(logits_MK.double() / self.temperature, dim=-1)[
            :, self.preferred_label
        ].float()

    def prefer(self, prompts: Sequence[Any], a: Sequence[Any], b: Sequence[Any]) -> torch.Tensor:
        """Tensor[M] float32: P(a_m ≻ b_m | prompt_m) for M pairs."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"{self.where}: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        if not len(prompts):
            return torch.zeros(0)
        a_text = [_completion_text(x) for x in a]
        b_text = [_completion_text(x) for x in b]
        if self.mode == "bradley_terry":
            both = self.score(list(prompts) * 2, a_text + b_text)
            r = self._head(both)
            m = len(prompts)
            return bradley_terry_prob(r[:m], r[m:], self.temperature)
        p_ab = self._joint(prompts, a_text, b_text)
        if not self.both_orders:
            return p_ab
        p_ba = self._joint(prompts, b_text, a_text)
        return 0.5 * (p_ab + 1.0 - p_ba)


# ---------------------------------------------------------------- the HTTP judge

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_SCORE_RE = re.compile(rf"score\W{{0,3}}\s*\**\s*({_NUMBER})", re.IGNORECASE)
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        return float(value.strip())
    return None


def parse_judge_reply(
    reply: str,
    parse: str = "number",
    *,
    json_key: str = "score",
    pattern: str | re.Pattern | None = None,
) -> float | None:
    """The score in a judge's reply, or None when there is none.

    number: the last ``Score: X`` (case-insensitive; ``score = X``, ``**Score:** X`` too),
            else the last number in the reply (so a template should ask for the score last).
    json:   the last JSON object in the reply (fenced or not) that has `json_key`; its value
            must be a number, a numeric string or a bool.
    regex:  group 1 of the first match of `pattern`.
    """
    if not isinstance(reply, str):
        return None
    if parse == "number":
        hits = _SCORE_RE.findall(reply) or _NUMBER_RE.findall(reply)
        return _as_number(hits[-1]) if hits else None
    if parse == "json":
        candidates = [*_FENCE_RE.findall(reply), reply]
        decoder = json.JSONDecoder()
        for text in candidates:
            found = None
            i = text.find("{")
            while i != -1:  # top-level objects only: a decoded one is skipped whole
                try:
                    obj, end = decoder.raw_decode(text, i)
                except ValueError:
                    i = text.find("{", i + 1)
                    continue
                if isinstance(obj, dict) and json_key in obj:
                    found = obj[json_key]
                i = text.find("{", end)
            if found is not None:
                return _as_number(found)
        return None
    if parse == "regex":
        if pattern is None:
            raise ValueError("parse_judge_reply: parse 'regex' needs a pattern")
        m = re.search(pattern, reply)
        return _as_number(m.group(1)) if m else None
    raise ValueError(
        f"parse_judge_reply: parse must be one of {', '.join(PARSE_MODES)}, got {parse!r}"
    )


class _Transient(Exception):
    """A request that failed after its retries (the server down, slow or overloaded)."""


@REWARD_MODELS.register("generative")
class GenerativeScorer:
    """An LLM judge behind an OpenAI-compatible HTTP server (vLLM, SGLang, a hosted API): a
    template in, the score parsed from its reply.

    ``score`` gives Tensor[N, 1], NaN where the reply held no score or its request failed
    after its retries. base_url: the API root as the OpenAI client takes it (``http://host:8000/v1``); model:
    the served model's name; endpoint: ``chat`` (POST /chat/completions, the rendered
    template as the user message after an optional `system` message) or ``completions``
    (POST /completions, the rendered template as the prompt); api_key_env: the environment
    variable holding the key (sent as ``Authorization: Bearer``; none: no header);
    template: str.format text with {prompt}, {completion} and any dataset column (literal
    braces doubled; null: `DEFAULT_JUDGE_TEMPLATE`, a 0-10 rating ending "Score: <n>"); parse / json_key / pattern: `parse_judge_reply`; min_score and
    max_score (both or neither): the score is mapped to (s − min) / (max − min), clipped
    to [0, 1]; max_tokens (512), temperature (0.0) and extra_body (more request fields,
    e.g. {seed: 0}); timeout: seconds per request (60); retries: further tries of a request
    that failed for a transient reason (2), after backoff·2^k seconds (0.5); concurrency:
    requests in flight at once (8); cache_size: cached scores (4096). A 4xx answer raises
    at once; when every request of a call fails, the call raises (the server is down).
    """

    kind = "generative"

    def __init__(
        self,
        where: str = "reward_model",
        /,
        *,
        base_url: str,
        model: str,
        template: str | None = None,
        system: str | None = None,
        endpoint: str = "chat",
        api_key_env: str | None = None,
        parse: str = "number",
        json_key: str = "score",
        pattern: str | None = None,
        min_score: float | None = None,
        max_score: float | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        extra_body: dict | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        concurrency: int = 8,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.where = where
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"{where}.base_url: an http(s) URL such as http://localhost:8000/v1, got {base_url!r}"
            )
        self.base_url = base_url.rstrip("/")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{where}.model: the served model's name, got {model!r}")
        self.model = model
        template = DEFAULT_JUDGE_TEMPLATE if template is None else template
        self.fields = _template_fields(template, f"{where}.template")
        self.template = template
        self.endpoint = _choice(endpoint, ENDPOINTS, f"{where}.endpoint")
        if system is not None and (not isinstance(system, str) or endpoint != "chat"):
            raise ValueError(f"{where}.system: a string, for endpoint chat only, got {system!r}")
        self.system = system
        if api_key_env is not None:
            if not isinstance(api_key_env, str) or not api_key_env:
                raise ValueError(
                    f"{where}.api_key_env: an environment variable's name, got {api_key_env!r}"
                )
            if api_key_env not in os.environ:
                raise ValueError(
                    f"{where}.api_key_env: the environment variable {api_key_env} is not set"
                )
        self.api_key_env = api_key_env
        self.parse = _choice(parse, PARSE_MODES, f"{where}.parse")
        if not isinstance(json_key, str) or not json_key:
            raise ValueError(f"{where}.json_key: a non-empty string, got {json_key!r}")
        self.json_key = json_key
        self.pattern: re.Pattern | None = None
        if parse == "regex" or pattern is not None:
            try:
                self.pattern = re.compile(pattern) if isinstance(pattern, str) else None
            except re.error as e:
                raise ValueError(f"{where}.pattern: not a regular expression: {e}") from None
            if self.pattern is None or self.pattern.groups < 1:
                raise ValueError(
                    f"{where}.pattern: a regular expression with one group (the score), got {pattern!r}"
                )
            if parse != "regex":
                raise ValueError(f"{where}.pattern: only read with parse: regex")
        if (min_score is None) != (max_score is None):
            raise ValueError(
                f"{where}.min_score, max_score: give both (to map scores to [0, 1]) or neither"
            )
        if min_score is not None:
            lo = _number(min_score, f"{where}.min_score")
            hi = _number(max_score, f"{where}.max_score")
            if hi <= lo:
                raise ValueError(f"{where}.max_score: must be > min_score ({lo}), got {hi}")
            self.range: tuple[float, float] | None = (lo, hi)
        else:
            self.range = None
        self.max_tokens = _int(max_tokens, f"{where}.max_tokens", low=1)
        self.temperature = _number(temperature, f"{where}.temperature", low=0.0)
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ValueError(f"{where}.extra_body: a mapping of request fields, got {extra_body!r}")
        self.extra_body = dict(extra_body or {})
        self.timeout = _number(timeout, f"{where}.timeout", low=0.0, strict=True)
        self.retries = _int(retries, f"{where}.retries", low=0)
        self.backoff = _number(backoff, f"{where}.backoff", low=0.0)
        self.concurrency = _int(concurrency, f"{where}.concurrency", low=1)
        self.cache = LRUCache(_int(cache_size, f"{where}.cache_size", low=0))
        self.last_stats: dict[str, float] = {}

    @property
    def num_heads(self) -> int:
        return 1

    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    def render(self, prompt: Any, completion: Any, row: Mapping[str, Any]) -> str:
        values = {"prompt": prompt_text(prompt), "completion": _completion_text(completion)}
        for f in self.fields:
            if f in values:
                continue
            if f not in row:
                raise ScorerError(
                    f"{self.where}.template: placeholder {{{f}}} is neither {{prompt}}, "
                    f"{{completion}} nor a column of this batch (columns: {', '.join(sorted(row)) or 'none'})"
                )
            values[f] = "" if row[f] is None else str(row[f])
        return self.template.format(**values)

    def body(self, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.endpoint == "chat":
            messages = [{"role": "system", "content": self.system}] if self.system else []
            body["messages"] = [*messages, {"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return {**body, **self.extra_body}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                    continue
                # 401/403: the key; 404: an unknown model (vLLM, OpenAI) or a wrong route
                key = {401: "api_key_env", 403: "api_key_env"}.get(e.code, "model")
                if e.code == 404 and "model" not in detail.lower():
                    key = "base_url"
                raise ScorerError(
                    f"{self.where}.{key}: POST {self.url} answered HTTP {e.code}: {detail}"
                ) from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", None) or e
                last = f"{type(e).__name__}: {reason}"
                continue
            try:
                return json.loads(payload)
            except ValueError:
                raise ScorerError(
                    f"{self.where}.base_url: {self.url} answered something that is not JSON: {payload[:200]!r}"
                ) from None
        raise _Transient(f"POST {self.url} failed after {self.retries + 1} tries: {last}")

    def _reply_text(self, response: Any) -> str:
        try:
            choice = response["choices"][0]
            text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            field = "choices[0].message.content" if self.endpoint == "chat" else "choices[0].text"
            raise ScorerError(
                f"{self.where}.endpoint: the answer of {self.url} has no {field} (is "
                f"{self.endpoint!r} the server's endpoint?): {str(response)[:200]}"
            ) from None
        return text or ""

    def ask(self, text: str) -> tuple[str, float | None]:
        """One request: the judge's reply to `text` and its score (None: none found)."""
        reply = self._reply_text(self._post(self.body(text)))
        score = parse_judge_reply(reply, self.parse, json_key=self.json_key, pattern=self.pattern)
        if score is not None and self.range is not None:
            lo, hi = self.range
            score = min(1.0, max(0.0, (score - lo) / (hi - lo)))
        return reply, score

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> torch.Tensor:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{self.where}: {len(prompts)} prompts for {n} completions")
        t0 = time.perf_counter()
        listed = {k: v for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == n}
        texts = [
            self.render(p, c, {k: v[i] for k, v in listed.items()})
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
        scores: dict[str, float] = {}
        todo = []
        for text in dict.fromkeys(texts):
            hit = self.cache.get((self.endpoint, self.system, text))
            if hit is None:
                todo.append(text)
            else:
                scores[text] = hit
        failed, last_error = 0, ""
        if todo:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)))
            try:
                futures = {pool.submit(self.ask, t): t for t in todo}
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for fut in futures:
                    if fut in done and isinstance(fut.exception(), ScorerError):
                        raise fut.exception()  # type: ignore[misc]  (a config error: stop now)
                for fut, text in futures.items():
                    try:
                        _, value = fut.result()
                    except _Transient as e:
                        failed, last_error = failed + 1, str(e)
                        continue
                    scores[text] = math.nan if value is None else value
                    self.cache.put((self.endpoint, self.system, text), scores[text])
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if failed == len(todo):
                raise ScorerError(
                    f"{self.where}.base_url: every request of this batch failed; the last: {last_error}"
                )
        out = torch.tensor([scores.get(t, math.nan) for t in texts], dtype=torch.float32)
        self.last_stats = {
            "requests": float(len(todo)),
            "failed_requests": float(failed),
            "unparsed": float(sum(math.isnan(scores.get(t, 0.0)) for t in dict.fromkeys(texts))),
            "seconds": time.perf_counter() - t0,
        }
        return out.reshape(n, 1)


# ---------------------------------------------------------------- building scorers


def build_scorer(spec: Any, where: str) -> Any:
    """The scorer of a spec mapping: ``kind`` (a `REWARD_MODELS` name) and its parameters,
    checked now (names, types, that a local path exists); weights load on first use.
    Errors name the key under `where`, e.g. ``rewards.pairwise_winrate.judge.path``."""
    kinds = ", ".join(REWARD_MODELS.names())
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where}: a reward model is a mapping with a kind ({kinds}), got {spec!r}"
        )
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind is None:
        raise ValueError(f"{where}.kind: required, one of {kinds}")
    if not isinstance(kind, str) or kind not in REWARD_MODELS:
        raise ValueError(
            f"{where}.kind: unknown reward model {kind!r}{did_you_mean(str(kind), REWARD_MODELS.names())}; known: {kinds}"
        )
    if "where" in params:
        raise ValueError(f"{where}.where: not a parameter")
    REWARD_MODELS.check_params(kind, params, where=where)
    return REWARD_MODELS.get(kind)(where, **params)  # where: positional-only, not config


# ---------------------------------------------------------------- a tiny in-tree model


def build_tiny_classifier(
    tokenizer: Any,
    *,
    num_labels: int = 1,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialized Qwen2ForSequenceClassification sized for a CPU (fp32, SDPA):
    `num_layers` decoder layers and `num_labels` heads over `tokenizer`'s vocabulary
    (e.g. `grouprl.models.tiny.build_char_tokenizer`). Save it with
    `grouprl.models.tiny.save_model` and name the folder as a classifier's `path`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )


def train_bradley_terry(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-2,
    head: int = 0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Fit head `head` of a sequence classifier to (chosen, rejected) text pairs with the
    Bradley–Terry loss −log σ(r(chosen) − r(rejected)) (arXiv 2203.02155, eq. 1), AdamW,
    `batch_size` pairs drawn with replacement per step; returns the last step's loss.
    For tests and examples on tiny models; the texts are what the scorer will see
    (prompt + separator + completion without a chat template)."""
    if not pairs:
        raise ValueError("train_bradley_terry: no pairs")
    gen = torch.Generator().manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value = math.nan
    try:
        for step in range(steps):
            idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
            texts = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            r = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[
                :, head
            ]
            loss = -torch.nn.functional.logsigmoid(r[:batch_size] - r[batch_size:]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = loss.item()
            if on_step is not None:
                on_step(step, loss_value)
    finally:
        tokenizer.padding_side = side
        model.eval()
    return loss_value
