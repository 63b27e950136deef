"""`rollout.vllm.mode: server`: sampling on a vLLM server (its own GPUs, or its own process),
and `grouprl vllm-serve`, which starts one the way the client needs it.

The client sends each prompt's token ids to `/v1/completions` (G samples, a seed per
prompt, the sampled tokens' log-probs) and, after every optimizer step, writes the policy's
weights as safetensors into `rollout.vllm.sync_dir` and asks the server to reload them in
place (`/collective_rpc reload_weights`), then resets its prefix cache. That folder must be
readable by the server (same machine, or a shared file system). Every call has a deadline:
a server that is down, stuck or slow fails the step with an error that names the step and
the server, never a silent hang.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from grouprl.config import ConfigError
from grouprl.rollout.base import RolloutEngineError, SamplingParams
from grouprl.rollout.vllm_common import (
    INSTALL_HINT,
    LOGPROBS_MODE,
    VLLM_MODES,
    VLLMEngine,
    VLLMSettings,
    expand_greedy,
    full_state_dict,
    samples_per_request,
)

WEIGHTS_FILE = "model.safetensors"


def http_json(url: str, payload: dict[str, Any] | None = None, *, timeout: float) -> Any:
    """GET (payload None) or POST JSON; the decoded JSON reply (None when empty). Raises
    OSError subclasses (URLError, TimeoutError, HTTPError) as urllib does."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body.strip() else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        detail = exc.read().decode(errors="replace")[:300]
        return f"the server answered HTTP {exc.code}: {detail}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no answer"
    return f"{type(exc).__name__}: {exc}"


class ServerVLLM(VLLMEngine):
    """Client of a vLLM server started with `grouprl vllm-serve` (or an equivalent `vllm
    serve`; docs/scaling.md)."""

    shared_by_processes = True  # one server for every trainer process: process 0 syncs it

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        settings: VLLMSettings,
        *,
        max_model_len: int,
    ) -> None:
        super().__init__(model, tokenizer, settings, max_model_len=max_model_len)
        self.url = settings.server_url
        self._pool: ThreadPoolExecutor | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        info = self._call(
            "/v1/models",
            None,
            settings.connect_timeout,
            "reaching the server at start-up",
            hint=(
                " Is it running? Start one with `grouprl vllm-serve --model MODEL_DIR --port "
                "PORT` and set rollout.vllm.server_url (docs/scaling.md)."
            ),
        )
        try:
            card = info["data"][0]
            self.model_name = card["id"]
        except (KeyError, IndexError, TypeError):
            raise RolloutEngineError(
                f"vLLM server at {self.url}: /v1/models gave no model ({info!r})"
            ) from None
        self.max_model_len = min(max_model_len, int(card.get("max_model_len") or max_model_len))
        if settings.sync_dir:
            self.sync_dir = Path(settings.sync_dir)
            self.sync_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="grouprl-vllm-sync-")
            self.sync_dir = Path(self._tmp.name)
        # The server may hold other weights (a resume). Several trainer processes share it:
        # process 0 alone pushes (the model is not sharded yet; the others meet it at the
        # trainer's first barrier, before anyone samples).
        if int(os.environ.get("RANK", "0")) == 0:
            self.update_weights(model, step=0)

    # ------------------------------------------------------------------ HTTP
    def _call(
        self,
        path: str,
        payload: dict[str, Any] | None,
        timeout: float,
        what: str,
        *,
        hint: str = "",
    ) -> Any:
        try:
            return http_json(self.url + path, payload, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise RolloutEngineError(
                f"{what}: vLLM server {self.url} ({path}) failed: {_why(exc)}.{hint}"
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise RolloutEngineError(
                f"{what}: vLLM server {self.url} ({path}) did not complete within "
                f"{timeout:g} s ({_why(exc)}).{hint}"
            ) from None

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(
        self,
        model: torch.nn.Module,
        *,
        step: int,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the weights where the server reads them and have it reload them in place.
        `weights`: the whole state dict when the caller has gathered it (several trainer
        processes share this server: process 0 syncs, see Learner.publish_weights)."""
        from safetensors.torch import save_file

        t0 = time.monotonic()
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, w in full_state_dict(model, weights).items():
            w = w.to("cpu").contiguous()
            if w.data_ptr() in seen:  # tied weights: safetensors wants distinct storage
                w = w.clone()
            seen.add(w.data_ptr())
            tensors[name] = w
        tmp = self.sync_dir / (WEIGHTS_FILE + ".partial")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.sync_dir / WEIGHTS_FILE)
        what = f"step {step}: weight sync"

        def left() -> float:  # one deadline for the whole sync
            return max(self.settings.sync_timeout - (time.monotonic() - t0), 1.0)

        self._call(
            "/collective_rpc",
            {
                "method": "reload_weights",
                "kwargs": {"weights_path": str(self.sync_dir), "is_checkpoint_format": True},
                "timeout": left(),  # the server gives up too, rather than reload on its own
            },
            left(),
            what,
            hint=(
                " The server needs VLLM_SERVER_DEV_MODE=1 (grouprl vllm-serve sets it) and "
                f"read access to {self.sync_dir} (rollout.vllm.sync_dir); a larger model may "
                "need a longer rollout.vllm.sync_timeout."
            ),
        )
        self._call("/reset_prefix_cache", {}, left(), what)
        self._step = step

    # ------------------------------------------------------------------ sampling
    def _complete(self, ids: list[int], seed: int, params: SamplingParams) -> Any:
        payload = {
            "model": self.model_name,
            "prompt": ids,
            "n": samples_per_request(params),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "max_tokens": params.max_new_tokens,
            "stop_token_ids": self.eos,
            # explicit, so that no server-side default (a model's generation_config) changes
            # the distribution the trainer compares with
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "min_p": 0.0,
            "logprobs": 0,
            "seed": seed,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        return self._call(
            "/v1/completions",
            payload,
            self.settings.request_timeout,
            f"step {self._step + 1}: sampling",
            hint=" (rollout.vllm.request_timeout)",
        )

    def _sample(
        self, prompt_ids: list[list[int]], params: SamplingParams
    ) -> list[list[tuple[list[int], list[float]]]]:
        seeds = self._seeds(len(prompt_ids), params)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="grouprl-vllm")
        replies = list(self._pool.map(self._complete, prompt_ids, seeds, [params] * len(seeds)))
        samples = []
        want = samples_per_request(params)
        for i, reply in enumerate(replies):
            try:
                choices = sorted(reply.get("choices") or [], key=lambda c: c["index"])
                group = [
                    (list(c["token_ids"]), list(c["logprobs"]["token_logprobs"])) for c in choices
                ]
            except (AttributeError, KeyError, TypeError) as exc:
                raise RolloutEngineError(
                    f"step {self._step + 1}: vLLM server {self.url} sent a reply for prompt {i} "
                    f"without token ids and log-probs ({type(exc).__name__}: {exc})"
                ) from None
            if len(group) != want:
                raise RolloutEngineError(
                    f"step {self._step + 1}: vLLM server {self.url} returned {len(group)} "
                    f"samples for prompt {i}, expected {want}"
                )
            samples.append(expand_greedy(group, params))
        return samples

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


VLLM_MODES["server"] = ServerVLLM


# ---------------------------------------------------------------------- grouprl vllm-serve
def serve_argv(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The command line of a vLLM OpenAI server that `ServerVLLM` can drive: log-probs after
    temperature (what the trainer compares with), prefix caching on."""
    if enforce_eager is None:
        enforce_eager = not torch.cuda.is_available()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--logprobs-mode",
        LOGPROBS_MODE,
        "--enable-prefix-caching",
        # vLLM's neutral sampling defaults, not the model's generation_config.json
        "--generation-config",
        "vllm",
    ]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(extra or [])


def serve_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the development routes the client uses for weight reload
    and cache reset (/collective_rpc, /reset_prefix_cache) are on; a CPU KV cache of 1 GiB
    unless set."""
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def run_server(argv: list[str]) -> None:
    """Replace this process with the vLLM server (signals reach vLLM directly)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(INSTALL_HINT.replace("rollout.engine 'vllm'", "grouprl vllm-serve"))
    print("starting: " + " ".join(argv[1:]), flush=True)
    os.execvpe(argv[0], argv, serve_env())


def launch_server(
    model: str | Path,
    *,
    port: int,
    log_path: str | Path,
    args: list[str] | None = None,
    timeout: float = 600.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `grouprl vllm-serve --model MODEL --port PORT ARGS` in its own process group,
    logging to `log_path`, and wait until it answers /health. Returns (process, url); stop it
    with `os.killpg(process.pid, signal.SIGTERM)`. Raises RolloutEngineError with the log's
    end when it exits or is not up within `timeout` seconds."""
    cmd = [sys.executable, "-m", "grouprl.cli", "vllm-serve", "--model", str(model)]
    cmd += ["--port", str(port), *(args or [])]
    log = Path(log_path)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RolloutEngineError(f"vLLM server exited: {log.read_text()[-3000:]}")
        try:
            http_json(url + "/health", timeout=2)
            return proc, url
        except (OSError, ValueError, http.client.HTTPException):
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RolloutEngineError(f"vLLM server not up in {timeout:g} s: {log.read_text()[-3000:]}")
