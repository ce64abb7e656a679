"""The SGLang server client (``--target-backend sglang-server``, GPU only).

For a disaggregated deployment: the target runs in a separate SGLang server (or an
``sglang.Engine`` with its own scheduler processes) and the trainer asks it, per
micro-batch and without sampling, for the target features of DESIGN.md §3 through its
``generate`` API. Every hidden state travels through SGLang's response path as nested
Python lists (JSON over HTTP): for a Qwen3-8B sample of 4,096 tokens x 5 taps x 4,096
that is ~84 M floats per sample, far slower than the target forward
(``tools/bench_target.py`` measures it). The default, ``--target-backend sglang``, runs
SGLang's ``ModelRunner`` inside the trainer and takes tensors
(:mod:`megaspark.targets.sglang_colocated`). The features:

* the tapped layers' raw outputs ``[b, S, L*H]`` and
* the post-final-norm last hidden state ``[b, S, H]``.

**What SGLang offers (sglang 0.5.23, read from its wheel; see the references below).**

* ``enable_return_aux_hidden_states=True`` with ``speculative_algorithm`` naming the
  capture convention (``"DSPARK"``, ``"DFLASH"`` or ``"EAGLE3"``; with this flag no draft
  is loaded and the speculative stack stays off) and ``return_aux_hidden_state_layer_ids``
  makes requests sent with ``return_hidden_states=True`` receive the *concatenated aux
  hidden states in place of the last-layer hidden states*
  (``sglang/srt/arg_groups/fields/exec_.py``, ``arg_groups/validation_hook.py::
  handle_aux_hidden_state_capture``, ``model_executor/model_runner_components/
  spec_aux_hidden_state.py``). The post-norm last state is computed alongside
  (``LogitsProcessorOutput.last_hidden_states``) but "not copied into the response
  path" (``sglang/srt/layers/logits_processor.py``). Without the flag,
  ``enable_return_hidden_states=True`` returns the post-norm last state only. One
  engine therefore cannot return both in one request (DESIGN.md §6).
* Per request: ``Engine.generate(input_ids=[[...], ...], sampling_params=[{...}],
  return_hidden_states=True)`` (``sglang/srt/entrypoints/engine.py``); the HTTP server's
  ``POST /generate`` takes the same fields. A prefill-only request
  (``max_new_tokens=0``) returns *no* hidden states (seen against real SGLang 0.5.23 on
  the CPU), so one greedy token is generated and its row, if any, ignored. Each output carries
  ``meta_info["hidden_states"]``: a list whose first entry is the prefill's
  ``[num_prefill_tokens, width]`` rows as nested Python lists (``managers/
  scheduler_components/batch_result_processor.py::_append_prefill_hidden_states``); any
  decode steps would append one row each.
* Layer-id convention: with the DFLASH/DSPARK convention the model hook
  ``set_dflash_layers_to_capture(ids)`` (or ``set_dspark_layers_to_capture``) stores
  ``layers_to_capture = [k + 1 for k in ids]`` and each decoder layer in that list
  captures the residual stream *entering* it, i.e. the output of layer ``k``
  (``sglang/srt/models/qwen3.py``, ``models/llama.py``; the comment there: "SGLang
  captures 'before layer i'. To capture the hidden state after target layer k (HF-style),
  we capture before layer k + 1"). So megaspark id ``k`` (output of decoder layer ``k`` =
  HF ``hidden_states[k+1]``) is passed to SGLang unchanged as
  ``return_aux_hidden_state_layer_ids``, and SGLang's internal capture index is ``k + 1``.
  The last layer ``N-1`` has no capture point (nothing runs after it), which is why
  DESIGN.md decision 2 forbids it. The captured layers come back in ascending layer order.

**Strategy for the last hidden state** (``SGLangOptions.last_hidden``):

* ``"tail"`` (default): one engine in aux mode captures the tapped layers *plus* layer
  ``N-2`` (the input of the last decoder layer). The provider then runs the target's
  last decoder layer and final norm itself (weights of that one layer read from the
  checkpoint, ~1/N of the target) on the captured layer ``N-2`` output. This is exact up
  to kernel numerics, costs one engine and one prefill. Supported for families whose HF
  backbone feeds ``inputs_embeds`` straight into the layers (:data:`TAIL_MODEL_TYPES`).
* ``"engine"``: a second, stock engine (``enable_return_hidden_states``) returns the
  post-norm last state. Works for any model SGLang serves, at twice the weights memory
  and two prefills per sample.

Engine placement (``SGLangOptions.url``): either an in-process ``sglang.Engine`` started
lazily on the first :meth:`compute` (so only the ranks that compute — tensor-parallel
rank 0 of each group — start one), or an already running per-node server
(``python -m sglang.launch_server``, see ``examples/slurm/``) reached over HTTP.

Prefix (radix) caching and chunked prefill are disabled in the engine kwargs: a cached
prefix or an uncommitted middle chunk would return fewer hidden-state rows than tokens
(the response parser refuses such a response rather than misalign it).

The request/response translation, the layer-id mapping, the capture plan and the local
tail are unit-tested on the CPU with a fake engine that answers from an HF model
(``tests/test_sglang.py``); what has run against real SGLang is in docs/STATUS.md.
"""
from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .base import TargetOutput, TargetProvider, resolve_layer_ids, validate_target_layer_ids
from .checkpoint import CheckpointWeights, TargetCheckpoint

FLAG = "--target-backend sglang-server"
#: Capture convention passed as ``speculative_algorithm`` in aux mode: the DSpark hook is
#: the one a served DSpark draft uses (falls back to the DFlash hook where a model has no
#: DSpark-specific one — same ``k + 1`` convention).
CAPTURE_CONVENTION = "DSPARK"
#: HF model types whose backbone applies nothing to ``inputs_embeds`` before the first
#: layer, so "last layer + final norm" can be run from a captured hidden state.
TAIL_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe"})


class SGLangResponseError(RuntimeError):
    """An engine response that does not match the request (shape, count, missing data)."""


# ---------------------------------------------------------------------------------------
# Layer ids
# ---------------------------------------------------------------------------------------

def to_sglang_layer_ids(layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """megaspark ids -> SGLang ``return_aux_hidden_state_layer_ids`` (DFLASH/DSPARK
    convention). Both mean "output of decoder layer k", so the values are unchanged; the
    ids are validated against DESIGN.md decision 2 first."""
    return list(validate_target_layer_ids(list(layer_ids), num_layers))


def from_sglang_layer_ids(sglang_ids: Sequence[int], num_layers: int) -> list[int]:
    """Inverse of :func:`to_sglang_layer_ids` (validates the same way)."""
    return list(validate_target_layer_ids([int(k) for k in sglang_ids], num_layers))


def to_sglang_capture_indices(layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """megaspark ids -> SGLang's internal ``model.layers_to_capture`` indices: decoder layer
    ``k + 1`` captures its input, which is the output of layer ``k``."""
    return [k + 1 for k in validate_target_layer_ids(list(layer_ids), num_layers)]


def from_sglang_capture_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    """Inverse of :func:`to_sglang_capture_indices`. Index 0 (the embedding, entering layer
    0) and index ``N`` (after the last layer, never reached) have no megaspark id."""
    N = int(num_layers)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= N - 1:
            raise ValueError(
                f"SGLang capture index {i!r} has no megaspark layer id for a {N}-layer target: "
                f"valid indices are 1..{N - 1} (index i captures the input of decoder layer i "
                f"= the output of layer i-1)")
    return list(validate_target_layer_ids([i - 1 for i in indices], N))


@dataclass(frozen=True)
class CapturePlan:
    """What the aux engine is asked to capture and how its columns are used."""

    layer_ids: tuple            # the draft's taps (megaspark ids)
    capture_ids: tuple          # sent as return_aux_hidden_state_layer_ids (ascending)
    aux_blocks: tuple           # position of each tap in capture_ids
    tail_block: Optional[int]   # position of layer N-2 in capture_ids ("tail" mode), else None
    num_layers: int
    hidden_size: int

    @property
    def capture_width(self) -> int:
        return len(self.capture_ids) * self.hidden_size

    @property
    def aux_width(self) -> int:
        return len(self.layer_ids) * self.hidden_size


def plan_capture(layer_ids: Sequence[int], num_layers: int, hidden_size: int,
                 last_hidden: str = "tail") -> CapturePlan:
    """The capture list for ``layer_ids``: in ``"tail"`` mode layer ``N-2`` is added (once)
    so the provider can run the last layer and the final norm itself."""
    if last_hidden not in ("tail", "engine"):
        raise ValueError(f"last_hidden must be 'tail' or 'engine', got {last_hidden!r}")
    N = int(num_layers)
    ids = to_sglang_layer_ids(layer_ids, N)
    tail_block = None
    capture = list(ids)
    if last_hidden == "tail":
        if N < 2:
            raise ValueError(f"a {N}-layer target has no layer N-2 to capture for the tail")
        capture = sorted(set(ids) | {N - 2})
        tail_block = capture.index(N - 2)
    return CapturePlan(
        layer_ids=tuple(ids), capture_ids=tuple(capture),
        aux_blocks=tuple(capture.index(k) for k in ids), tail_block=tail_block,
        num_layers=N, hidden_size=int(hidden_size),
    )


def split_capture(rows: Tensor, plan: CapturePlan) -> tuple[Tensor, Optional[Tensor]]:
    """``[S, C*H]`` engine rows -> (aux ``[S, L*H]`` in tap order, tail input ``[S, H]`` or None)."""
    H = plan.hidden_size
    if rows.shape[-1] != plan.capture_width:
        raise SGLangResponseError(
            f"expected {plan.capture_width} = {len(plan.capture_ids)} captured layers x {H} "
            f"features per token, got {rows.shape[-1]}")
    blocks = rows.reshape(*rows.shape[:-1], len(plan.capture_ids), H)
    if list(plan.aux_blocks) == list(range(len(plan.layer_ids))) and len(plan.capture_ids) == len(plan.layer_ids):
        aux = rows
    else:
        aux = blocks[..., list(plan.aux_blocks), :].reshape(*rows.shape[:-1], plan.aux_width)
    tail = blocks[..., plan.tail_block, :] if plan.tail_block is not None else None
    return aux, tail


# ---------------------------------------------------------------------------------------
# Requests and responses
# ---------------------------------------------------------------------------------------

def strip_padding(input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> list[list[int]]:
    """``[b, S]`` token ids -> one token list per sample, right padding removed.

    Without a mask every position is sent (as the HF provider does: with right padding
    the real positions do not see the padding). A mask must be right-padded (ones then
    zeros) and leave at least one token per sample.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().cpu().tolist()
    if attention_mask is None:
        return ids
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"input_ids shape {tuple(input_ids.shape)}")
    out = []
    for i, row in enumerate(attention_mask.detach().cpu().to(torch.int64).tolist()):
        n = sum(row)
        if n < 1 or row != [1] * n + [0] * (len(row) - n):
            raise ValueError(f"attention_mask row {i} is not right padding (ones then zeros, "
                             f"at least one token): {row}")
        out.append(ids[i][:n])
    return out


def group_requests(lengths: Sequence[int], max_tokens_per_request: int) -> list[list[int]]:
    """Indices of samples grouped into engine calls of at most ``max_tokens_per_request``
    tokens each (a longer sample goes alone), keeping sample order."""
    if max_tokens_per_request < 1:
        raise ValueError("max_tokens_per_request must be >= 1")
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens_per_request:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def build_generate_request(token_lists: Sequence[Sequence[int]], max_new_tokens: int = 1) -> dict:
    """Keyword arguments for ``Engine.generate`` (and the JSON body of ``POST /generate``):
    the token ids as given, greedy (one new token by default: a prefill-only request gets no
    hidden states back from SGLang), hidden states of every prompt position."""
    if not token_lists:
        raise ValueError("no token lists to send")
    for i, t in enumerate(token_lists):
        if len(t) == 0:
            raise ValueError(f"sample {i} has no tokens")
    params = {"max_new_tokens": int(max_new_tokens)}
    if max_new_tokens > 0:
        params["temperature"] = 0.0  # greedy: the generated token is never used
    return {
        "input_ids": [[int(x) for x in t] for t in token_lists],
        "sampling_params": [dict(params) for _ in token_lists],
        "return_hidden_states": True,
    }


def parse_hidden_states(output: Mapping, num_tokens: int, width: int,
                        dtype: torch.dtype = torch.bfloat16, index: int = 0) -> Tensor:
    """The ``[num_tokens, width]`` prompt hidden states of one ``generate`` output.

    ``output["meta_info"]["hidden_states"]`` is a list whose first entry holds the prefill
    rows (nested lists, or a tensor/array); later entries (decode steps, if any) are
    ignored. Fewer rows than prompt tokens (prefix cache, chunked prefill) or a different
    width is an error.
    """
    meta = output.get("meta_info") if isinstance(output, Mapping) else None
    if not isinstance(meta, Mapping) or meta.get("hidden_states") is None:
        raise SGLangResponseError(
            f"output {index} has no meta_info['hidden_states']: start the engine with "
            f"enable_return_aux_hidden_states (or enable_return_hidden_states) and send "
            f"return_hidden_states=True")
    hs = meta["hidden_states"]
    if isinstance(hs, (list, tuple)):
        if len(hs) == 0:
            raise SGLangResponseError(f"output {index}: meta_info['hidden_states'] is empty")
        first = hs[0]
        # [[row, row, ...], (decode rows) ...] vs. a bare [S, width] list of rows
        nested = isinstance(first, (list, tuple)) and len(first) > 0 and isinstance(first[0], (list, tuple))
        prefill = first if (nested or isinstance(first, Tensor)) else hs
    else:
        prefill = hs
    t = prefill if isinstance(prefill, Tensor) else torch.as_tensor(prefill, dtype=torch.float32)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2:
        raise SGLangResponseError(
            f"output {index}: expected [tokens, {width}] prompt hidden states, got shape {tuple(t.shape)}")
    if t.shape[1] != width:
        raise SGLangResponseError(
            f"output {index}: hidden-state width {t.shape[1]} != expected {width} (the engine's "
            f"captured layers do not match the request)")
    if t.shape[0] != num_tokens:
        raise SGLangResponseError(
            f"output {index}: {t.shape[0]} hidden-state rows for {num_tokens} prompt tokens (a "
            f"prefix cache or chunked prefill skipped rows: run the engine with "
            f"disable_radix_cache=True and chunked_prefill_size=-1)")
    return t.to(dtype)


def parse_generate_response(outputs: Any, lengths: Sequence[int], width: int,
                            dtype: torch.dtype = torch.bfloat16) -> list[Tensor]:
    """One ``[len_i, width]`` tensor per sample from a batched ``generate`` answer."""
    if isinstance(outputs, Mapping):
        outputs = [outputs]
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(lengths):
        n = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise SGLangResponseError(f"sent {len(lengths)} samples, got {n} outputs back")
    return [parse_hidden_states(o, n, width, dtype, index=i) for i, (o, n) in enumerate(zip(outputs, lengths))]


def pad_batch(rows: Sequence[Tensor], seq_len: int) -> Tensor:
    """Stack ``[len_i, W]`` tensors into ``[b, seq_len, W]``, zeros after each sample's end."""
    if not rows:
        raise ValueError("no rows to pad")
    W, dtype = rows[0].shape[-1], rows[0].dtype
    out = torch.zeros(len(rows), seq_len, W, dtype=dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        if r.shape[0] > seq_len:
            raise ValueError(f"sample {i} has {r.shape[0]} rows > sequence length {seq_len}")
        out[i, : r.shape[0]] = r
    return out


# ---------------------------------------------------------------------------------------
# Options and the translation to SGLang engine / server arguments
# ---------------------------------------------------------------------------------------

@dataclass
class SGLangOptions:
    """Settings of the SGLang engine or server (flags ``--sglang-*``, built by
    :func:`megaspark.arguments.configs.sglang_options`)."""

    url: Optional[str] = None                 # a running server ("http://127.0.0.1:30000"); None: in-process
    tp_size: int = 1                          # the engine's own tensor parallelism
    dp_size: int = 1                          # engine data-parallel replicas (server mode)
    base_gpu_id: Optional[int] = None         # first GPU of the engine; None: this rank's device
    mem_fraction_static: float = 0.35         # weights + KV pool share of GPU memory (the trainer gets the rest)
    dtype: str = "bfloat16"
    context_length: Optional[int] = None      # >= --seq-length
    max_tokens_per_request: int = 65536       # tokens per generate call
    max_new_tokens: int = 1                   # SGLang returns no hidden states for 0 (prefill only)
    last_hidden: str = "tail"                 # "tail" | "engine" (see module docstring)
    last_hidden_url: Optional[str] = None     # second (stock) server for last_hidden="engine"
    random_seed: int = 42
    request_timeout: float = 600.0
    startup_timeout: float = 900.0            # wait for a server to come up on first contact
    extra_engine_kwargs: dict = field(default_factory=dict)
    #: where an in-process engine runs: "cuda" (the product) or "cpu" (SGLang's torch-native
    #: path with megaspark's stand-ins; what tools/bench_target.py and the tests use)
    device: str = "cuda"

    def validate(self) -> None:
        if self.tp_size < 1 or self.dp_size < 1:
            raise ValueError("--sglang-tp-size and --sglang-dp-size must be >= 1")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"--sglang-mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if self.last_hidden not in ("tail", "engine"):
            raise ValueError(f"--sglang-last-hidden must be 'tail' or 'engine', got {self.last_hidden!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1 (SGLang returns no hidden states for a "
                             "prefill-only request)")
        if self.max_tokens_per_request < 1:
            raise ValueError("--sglang-max-tokens-per-request must be >= 1")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")


#: Environment fallbacks for the server URLs (what the Slurm launcher sets)
ENV_URL = "MEGASPARK_SGLANG_URL"
ENV_LAST_HIDDEN_URL = "MEGASPARK_SGLANG_LAST_HIDDEN_URL"


def engine_kwargs(options: SGLangOptions, model_path: str, plan: Optional[CapturePlan],
                  mode: str = "aux") -> dict:
    """``sglang.Engine(**kwargs)`` (= ``ServerArgs`` fields) for the aux engine
    (``mode="aux"``: tapped layers, in place of the last state) or the stock engine
    (``mode="last"``: post-norm last state)."""
    options.validate()
    if mode not in ("aux", "last"):
        raise ValueError(f"mode must be 'aux' or 'last', got {mode!r}")
    kw = {
        "model_path": str(model_path),
        "tp_size": int(options.tp_size),
        "mem_fraction_static": float(options.mem_fraction_static),
        "dtype": options.dtype,
        "random_seed": int(options.random_seed),
        "skip_tokenizer_init": True,        # we send token ids; no text out
        "disable_radix_cache": True,        # every prompt row must be computed and returned
        "chunked_prefill_size": -1,         # one prefill per prompt (all rows committed at once)
        "log_level": "error",
    }
    if options.device == "cpu":  # SGLang's torch-native CPU path
        kw.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True,
                  sampling_backend="pytorch", skip_server_warmup=True,
                  max_total_tokens=int(options.max_tokens_per_request))
    if options.dp_size != 1:
        kw["dp_size"] = int(options.dp_size)
    if options.base_gpu_id is not None:
        kw["base_gpu_id"] = int(options.base_gpu_id)
    if options.context_length is not None:
        kw["context_length"] = int(options.context_length)
    if mode == "aux":
        if plan is None:
            raise ValueError("the aux engine needs a capture plan")
        kw["enable_return_aux_hidden_states"] = True
        kw["speculative_algorithm"] = CAPTURE_CONVENTION
        kw["return_aux_hidden_state_layer_ids"] = list(plan.capture_ids)
    else:
        kw["enable_return_hidden_states"] = True
    kw.update(options.extra_engine_kwargs)
    return kw


def server_argv(kwargs: Mapping[str, Any], host: str = "127.0.0.1", port: int = 30000,
                python: str = "python3") -> list[str]:
    """``python -m sglang.launch_server`` command for the same settings as ``kwargs``
    (``ServerArgs`` field ``x_y`` is flag ``--x-y``; booleans are store-true flags; lists
    take several values)."""
    argv = [python, "-m", "sglang.launch_server"]
    items = dict(kwargs)
    items.pop("log_level", None)
    items.update(host=host, port=int(port))
    for k, v in items.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                argv.append(flag)
        elif isinstance(v, (list, tuple)):
            argv.append(flag)
            argv.extend(str(x) for x in v)
        elif v is not None:
            argv.extend([flag, str(v)])
    return argv


# ---------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------

def check_sglang_available(need_import: bool = True, device: str = "cuda") -> None:
    """Fail fast, naming ``--target-backend sglang-server``: a GPU (unless the engine is
    explicitly put on the CPU), and (for an in-process engine) an importable sglang."""
    from megaspark import platform

    if device == "cpu":
        if need_import:
            from .sglang_runtime import check_available

            check_available("cpu", FLAG)
        return
    platform.require_gpu(FLAG, "an SGLang server")
    if need_import:
        from .sglang_runtime import missing_message

        missing = missing_message(FLAG, f", or point --sglang-url / {ENV_URL} at a running SGLang server")
        if missing:
            raise RuntimeError(missing)


def check_server_info(info: Mapping, expected: Mapping[str, Any], url: str = "") -> None:
    """Refuse a server whose settings differ from what this provider would have started
    (``GET /server_info`` returns the resolved ``ServerArgs``)."""
    bad = []
    for k, v in expected.items():
        if k not in info:
            continue  # not every field is reported by every version
        got = info[k]
        if isinstance(v, (list, tuple)):
            ok = isinstance(got, (list, tuple)) and [int(x) for x in got] == [int(x) for x in v]
        else:
            ok = got == v
        if not ok:
            bad.append(f"{k}={got!r} (need {v!r})")
    if bad:
        raise RuntimeError(f"the SGLang server {url} runs with {', '.join(bad)}; restart it with "
                           f"the settings printed by examples/slurm/render_commands.py")


class InProcessEngine:
    """``sglang.Engine`` in this process (it spawns its own scheduler workers)."""

    def __init__(self, kwargs: Mapping[str, Any]):
        import sglang

        self.engine = sglang.Engine(**dict(kwargs))

    def generate(self, request: Mapping[str, Any]):
        return self.engine.generate(**dict(request))

    def shutdown(self) -> None:
        self.engine.shutdown()


class HTTPEngine:
    """A running SGLang server (``POST /generate``; ``GET /server_info``)."""

    def __init__(self, url: str, timeout: float = 600.0, startup_timeout: float = 900.0,
                 expected: Optional[Mapping[str, Any]] = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.expected = dict(expected or {})
        self._checked = False

    def _request(self, path: str, body: Optional[dict] = None, timeout: Optional[float] = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
            return json.loads(r.read().decode())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                info = self._request("/server_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{FLAG}: no SGLang server answered at {self.url} within "
                                       f"{self.startup_timeout:.0f} s ({e})") from e
                time.sleep(5)
        check_server_info(info, self.expected, self.url)
        self._checked = True

    def generate(self, request: Mapping[str, Any]):
        if not self._checked:
            self._wait_ready()
        return self._request("/generate", dict(request))

    def shutdown(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Checkpoint access: the tail (last layer + final norm) and the frozen embedding / head
# ---------------------------------------------------------------------------------------

class TargetTail(torch.nn.Module):
    """The target's last decoder layer and final norm, run on the captured output of layer
    ``N-2``: ``norm(layer_{N-1}(h))`` == the post-norm last hidden state."""

    def __init__(self, path: str, text_config, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        super().__init__()
        from transformers import AutoModel

        mt = getattr(text_config, "model_type", None)
        if mt not in TAIL_MODEL_TYPES:
            raise ValueError(
                f"--sglang-last-hidden tail supports model types {sorted(TAIL_MODEL_TYPES)}, not "
                f"{mt!r}: use --sglang-last-hidden engine (a second, stock SGLang engine)")
        N = int(text_config.num_hidden_layers)
        cfg = copy.deepcopy(text_config)
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [text_config.layer_types[N - 1]]
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = AutoModel.from_config(cfg)
        model.embed_tokens = torch.nn.Identity()  # fed with hidden states, never token ids
        ckpt = TargetCheckpoint(path)
        prefix = ckpt.prefix_of_layers(N)
        want = [k for k in ckpt.keys() if k.startswith(f"{prefix}layers.{N - 1}.")] + [f"{prefix}norm.weight"]
        tensors = ckpt.get(want)
        sd = {}
        for k, v in tensors.items():
            name = k[len(prefix):].replace(f"layers.{N - 1}.", "layers.0.", 1)
            sd[name] = v.to(device=device, dtype=dtype)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith(("embed_tokens", "rotary_emb"))]
        if missing or unexpected:
            raise RuntimeError(f"tail weights do not match the model: missing {missing}, unexpected {unexpected}")
        # rotary buffers are computed at init, not stored: build them for real, in fp32
        model.rotary_emb = type(model.rotary_emb)(cfg).to(device)
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_meta:
                raise RuntimeError(f"tail tensor {n} was not loaded")
        model.requires_grad_(False)
        model.eval()
        self.model = model

    @torch.no_grad()
    def forward(self, h: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """``h``: ``[b, S, H]`` output of layer ``N-2``; returns ``[b, S, H]`` post-norm."""
        p = next(self.model.parameters())
        out = self.model(inputs_embeds=h.to(device=p.device, dtype=p.dtype),
                         attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


# ---------------------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------------------

class SGLangTargetProvider(CheckpointWeights, TargetProvider):
    """Frozen target served by a co-located SGLang engine (``--target-backend sglang``).

    Args:
        model_path_or_name: local HF model directory (or ``builtin:<name>``); the engine
            loads it, the provider reads its config, tokenizer and (for the tail, the
            embedding and the LM head) a few tensors from it.
        layer_ids: tapped layers (megaspark ids); ``None``: DFlash default rule.
        options: :class:`SGLangOptions` (engine TP size, memory fraction, server URL …).
        dtype: dtype of the returned features (and of the tail).
        device: where features are returned (default: the current CUDA device).
        engine, last_hidden_engine: objects with ``generate(request) -> outputs`` to use
            instead of starting/connecting engines (tests; callers that own the engine).
            Passing ``engine`` skips the GPU/sglang checks.
    """

    last_hidden_is_post_norm = True

    def __init__(self, model_path_or_name: str, layer_ids: Optional[Sequence[int]] = None,
                 options: Optional[SGLangOptions] = None, dtype: torch.dtype = torch.bfloat16,
                 device=None, engine=None, last_hidden_engine=None):
        self.options = options or SGLangOptions()
        self.options.validate()
        if engine is None:
            check_sglang_available(need_import=self.options.url is None, device=self.options.device)
        from .builtin import resolve_target
        from .hf import load_config_offline, load_tokenizer_offline

        self.name = str(model_path_or_name)
        self.path = resolve_target(model_path_or_name)
        self.hf_config = load_config_offline(self.path).get_text_config()
        N = int(self.hf_config.num_hidden_layers)
        self.layer_ids = resolve_layer_ids(layer_ids, N)
        self.plan = plan_capture(self.layer_ids, N, self.hidden_size, self.options.last_hidden)
        self.dtype = dtype
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer_offline(self.path)
        self._engine = engine
        self._last_engine = last_hidden_engine
        self.tail = TargetTail(self.path, self.hf_config, dtype, self.device) if self.plan.tail_block is not None else None
        if self.options.last_hidden == "engine" and last_hidden_engine is None and engine is not None:
            raise ValueError("last_hidden='engine' with an injected engine needs last_hidden_engine too")

    # -- engines ------------------------------------------------------------------------
    def aux_engine_kwargs(self) -> dict:
        return engine_kwargs(self._placed_options(), self.path, self.plan, "aux")

    def last_engine_kwargs(self) -> dict:
        return engine_kwargs(self._placed_options(), self.path, None, "last")

    def _placed_options(self) -> SGLangOptions:
        o = copy.copy(self.options)
        if o.base_gpu_id is None and o.url is None and self.device.type == "cuda":
            o.base_gpu_id = self.device.index or 0
        return o

    def _expected_server(self, kwargs: Mapping[str, Any]) -> dict:
        keys = ("enable_return_aux_hidden_states", "return_aux_hidden_state_layer_ids",
                "enable_return_hidden_states", "disable_radix_cache", "chunked_prefill_size")
        return {k: kwargs[k] for k in keys if k in kwargs}

    def engine(self):
        if self._engine is None:
            kw = self.aux_engine_kwargs()
            if self.options.url:
                self._engine = HTTPEngine(self.options.url, self.options.request_timeout,
                                          self.options.startup_timeout, self._expected_server(kw))
            else:
                self._engine = InProcessEngine(kw)
        return self._engine

    def last_hidden_engine(self):
        if self._last_engine is None:
            kw = self.last_engine_kwargs()
            if self.options.last_hidden_url:
                self._last_engine = HTTPEngine(self.options.last_hidden_url, self.options.request_timeout,
                                               self.options.startup_timeout, self._expected_server(kw))
            elif self.options.url:
                raise RuntimeError(f"{FLAG} with --sglang-last-hidden engine and a server URL needs "
                                   f"--sglang-last-hidden-url / {ENV_LAST_HIDDEN_URL} (the stock server)")
            else:
                self._last_engine = InProcessEngine(kw)
        return self._last_engine

    def _run(self, engine, token_lists: list, width: int) -> list:
        rows: list = [None] * len(token_lists)
        lengths = [len(t) for t in token_lists]
        for group in group_requests(lengths, self.options.max_tokens_per_request):
            req = build_generate_request([token_lists[i] for i in group], self.options.max_new_tokens)
            outs = engine.generate(req)
            parsed = parse_generate_response(outs, [lengths[i] for i in group], width, self.dtype)
            for i, t in zip(group, parsed):
                rows[i] = t
        return rows

    # -- TargetProvider -----------------------------------------------------------------
    @torch.no_grad()
    def compute(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TargetOutput:
        token_lists = strip_padding(input_ids, attention_mask)
        S = input_ids.shape[1]
        captured = self._run(self.engine(), token_lists, self.plan.capture_width)
        aux_rows, tail_rows = [], []
        for r in captured:
            aux, tail_in = split_capture(r, self.plan)
            aux_rows.append(aux)
            tail_rows.append(tail_in)
        aux = pad_batch(aux_rows, S).to(self.device)
        if self.tail is not None:
            mask = None if attention_mask is None else attention_mask.to(self.device)
            last = self.tail(pad_batch(tail_rows, S).to(self.device), mask).to(self.dtype)
            if mask is not None:  # zeros after each sample's end, like the aux rows
                last = last * mask[..., None].to(last.dtype)
        else:
            last = pad_batch(self._run(self.last_hidden_engine(), token_lists, self.hidden_size), S)
            last = last.to(self.device)
        return TargetOutput(aux_hidden_states=aux, last_hidden_states=last)

    def final_norm(self):
        return None  # last_hidden_states are post-norm

    def close(self) -> None:
        for e in (self._engine, self._last_engine):
            if e is not None and hasattr(e, "shutdown"):
                e.shutdown()
        self._engine = self._last_engine = None

    def __repr__(self) -> str:
        c = self.hf_config
        where = self.options.url or "in-process"
        return (f"SGLangTargetProvider({self.name!r}, {c.model_type}, layers={c.num_hidden_layers}, "
                f"layer_ids={self.layer_ids}, capture={list(self.plan.capture_ids)}, "
                f"last_hidden={self.options.last_hidden}, engine={where})")


def build_sglang_target(spec, device=None) -> SGLangTargetProvider:
    """What start-up calls for ``--target-backend sglang-server`` (a :class:`~.base.TargetSpec`
    whose ``server`` holds the :class:`SGLangOptions`)."""
    return SGLangTargetProvider(spec.path, layer_ids=list(spec.layer_ids), options=spec.server,
                                device=device, dtype=spec.dtype)


__all__ = [
    "SGLangTargetProvider", "SGLangOptions", "CapturePlan", "SGLangResponseError", "TargetTail",
    "to_sglang_layer_ids", "from_sglang_layer_ids", "to_sglang_capture_indices",
    "from_sglang_capture_indices", "plan_capture", "split_capture", "strip_padding",
    "group_requests", "build_generate_request", "parse_hidden_states", "parse_generate_response",
    "pad_batch", "engine_kwargs", "server_argv",
    "check_sglang_available", "check_server_info", "build_sglang_target",
]
