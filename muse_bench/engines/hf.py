"""The Hugging Face engine: batched greedy decoding and scoring with any causal LM module."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from muse_bench.core.errors import ConfigError
from muse_bench.core.models import cache_keyword, forward_parameters
from muse_bench.engines.background import LANE, ScoringJob
from muse_bench.engines.base import (
    DECODE_KWARGS,
    ENGINES,
    Ready,
    TokenScores,
    encode_texts,
    fit_prompt,
    stop_settled,
)
from muse_bench.engines.kv_reserve import reserve


def _length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first (so OOM shows early).

    A batch holds at most `batch_size` rows and, with `max_tokens`, at most that many
    padded tokens (rows x its longest row), but always at least one row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]  # longest first: the first is widest
        full = len(batch) == batch_size
        if batch and (full or (max_tokens is not None and (len(batch) + 1) * width > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


#: Padded tokens per scoring batch on CPU, where a forward pass runs fastest on a few
#: thousand tokens (embedded target, 2 threads: 1.25 s for the privleak texts in batches of
#: ~3k tokens against 1.53 s in batches of 32 texts, ~8k tokens: the logits of a large
#: batch no longer fit the caches). GPUs take whole batches.
CPU_SCORE_TOKENS = 3072


#: Shortest shared prompt prefix worth a prefill of its own.
MIN_SHARED_PREFIX = 16


def _cache_can(cache: Any, method: str) -> bool:
    """Whether `cache` (or every cache of a tuple, as a wrapper running several models
    such as WHP returns) has the Hugging Face cache method `method`."""
    if isinstance(cache, tuple):
        return bool(cache) and all(_cache_can(c, method) for c in cache)
    return hasattr(cache, method)


def _cache_apply(cache: Any, method: str, arg: Any) -> None:
    """Call `method(arg)` on `cache` (in place) or on every cache of a tuple."""
    for member in cache if isinstance(cache, tuple) else (cache,):
        getattr(member, method)(arg)


_MODE_LOCK = threading.Lock()
#: id(model) -> [blocks in eval mode now, whether the model was training before the first]
_MODE_HOLDS: dict[int, list] = {}


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Run `model` in eval mode (no dropout), then restore the mode it had.

    Blocks may overlap (background scoring runs beside generation): the model returns to
    training mode only when the last one ends.
    """
    with _MODE_LOCK:
        hold = _MODE_HOLDS.setdefault(id(model), [0, getattr(model, "training", False)])
        if hold[0] == 0 and hold[1]:
            model.eval()
        hold[0] += 1
    try:
        yield
    finally:
        with _MODE_LOCK:
            hold[0] -= 1
            if hold[0] == 0:
                del _MODE_HOLDS[id(model)]
                if hold[1]:
                    model.train()


def _progress(total: int, desc: str | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=desc is None, leave=False)


@ENGINES.register("hf")
class HFEngine:
    """Batched greedy generation and per-token log-probs for a causal LM module.

    The model is only ever called as
    `model(input_ids=, attention_mask=, position_ids=, cache=, use_cache=)` and only
    `.logits` and `.cache` of the result are read, so a wrapper module that
    implements just that forward (an inference-time unlearner such as WHP) works too. A model
    whose forward has no `cache` parameter (transformers before the rename, or a wrapper
    written for it) is called and read with `past_key_values` instead (`cache_keyword`).
    Generation uses `use_cache=True` (with `cache=None` on the first step, then
    whatever cache object the model returned); when all prompts of a batch share a long
    token prefix, the prefix is run once for one row and its cache repeated to the batch
    (only for caches with `batch_repeat_interleave`, or tuples of them). Scoring uses
    `cache=None, use_cache=False`. Models whose forward names a `logits_to_keep` parameter (Hugging Face
    causal LMs) also get `logits_to_keep=1` while generating, to save memory. The model
    runs in eval mode; its previous mode is restored afterwards.

    Results equal one-example-at-a-time evaluation: prompts are left-padded with position
    ids computed from the attention mask, texts are right-padded, and inputs are
    processed longest first and returned in input order.

    Scoring batches hold at most `batch_size` texts and, with `score_tokens` (default
    `CPU_SCORE_TOKENS` on CPU, none elsewhere), at most that many padded tokens.

    `submit_token_logprobs` scores on a background thread while the caller generates
    (on CPU with two or more torch threads, unless `background_scoring=False`).

    Truncation (`max_length`, default the model's `max_position_embeddings`): a prompt
    longer than `max_length - max_new_tokens` keeps BOS and its last tokens (the text
    nearest to the continuation); a scored text keeps its first `max_length` tokens.
    """

    supports_stats = True

    def __init__(
        self,
        *,
        model: Any = None,
        tokenizer: Any = None,
        model_path: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
        score_tokens: int | None = None,
        background_scoring: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {batch_size}.")
        if model is None:
            if model_path is None:
                raise ConfigError("the hf engine needs a model or a model_path.")
            from muse_bench.core.models import load_model

            model = load_model(model_path, device=device)
        if tokenizer is None:
            if model_path is None:
                raise ConfigError(
                    "the hf engine needs a tokenizer or a model_path to load it from."
                )
            from muse_bench.core.models import load_tokenizer

            tokenizer = load_tokenizer(model_path)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.background_scoring = background_scoring
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        self.device = param.device if param is not None else torch.device(device)
        # padded tokens per scoring batch (see CPU_SCORE_TOKENS); None: batch_size only
        self.score_tokens = score_tokens or (
            CPU_SCORE_TOKENS if self.device.type == "cpu" else None
        )
        config = getattr(model, "config", None)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None)
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        self.eos_ids = self._eos_ids()
        # Only the last position's logits are needed while generating; pass the hint
        # only to models that name it (plain wrappers get the plain forward call).
        params = forward_parameters(model)
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_kw = cache_keyword(model)

    def _eos_ids(self) -> list[int]:
        """EOS ids of the tokenizer and of the model's generation config (as model.generate)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos is not None:
            ids.update(int(i) for i in gen_eos)
        return sorted(ids)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        desc: str | None = None,
    ) -> list[str]:
        """Greedy-decode up to `max_new_tokens` after each prompt; return the new text only.

        A row stops early once its text up to the earliest of `stop` is settled; a batch
        ends when every row has stopped.
        """
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, not {max_new_tokens}.")
        if max_new_tokens == 0:
            return ["" for _ in prompts]
        bos = self.tokenizer.bos_token_id
        encoded = [
            fit_prompt(ids, bos, self.max_length, max_new_tokens)
            for ids in encode_texts(self.tokenizer, prompts)
        ]
        results: list[str] = [""] * len(encoded)
        with _progress(len(encoded), desc) as bar, _eval_mode(self.model):
            for batch in _length_sorted_batches([len(x) for x in encoded], self.batch_size):
                with LANE.foreground():
                    new_tokens = self._greedy([encoded[i] for i in batch], max_new_tokens, stop)
                for i, toks in zip(batch, new_tokens, strict=True):
                    results[i] = self.tokenizer.decode(toks, **DECODE_KWARGS)
                bar.update(len(batch))
        return results

    @torch.inference_mode()
    def _greedy(
        self, rows: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[list[int]]:
        """New token ids of each row (EOS and anything after it dropped)."""
        n = len(rows)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        # Prompts that open alike (knowmem's few-shot prefix) share one prefill of the
        # common tokens; each row then only prefills its own rest.
        shared, past = self._shared_prefix_cache(rows, extra)
        rests = [row[shared:] for row in rows]
        width = max(len(r) for r in rests)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, shared + width), dtype=torch.long)
        attention_mask[:, :shared] = 1
        for b, rest in enumerate(rests):
            input_ids[b, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            attention_mask[b, shared + width - len(rest) :] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        # Positions count real tokens only, so a left-padded row sees the same positions
        # as the unpadded prompt; pad slots get 0 (they are masked out anyway).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        next_position = attention_mask.sum(-1, keepdim=True)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        tokens = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        active = torch.arange(n, device=self.device)  # the input row of each batch row
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        lengths = [max_new_tokens] * n  # tokens each input row generated before it stopped
        steps = 0
        for step in range(max_new_tokens):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kw: past},
                **extra,
            )
            past = getattr(out, self._cache_kw)
            if step == 0:  # room for the tokens to come: no cache copy per step
                past = reserve(past, max_new_tokens - 1)
            token = out.logits[:, -1, :].argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            tokens[active, step] = token
            steps = step + 1
            done_before = finished.clone()
            finished |= torch.isin(token, eos)
            if stop:
                finished |= self._stopped(tokens[active, :steps], finished, stop)
            for row in active[finished & ~done_before].tolist():
                lengths[row] = steps
            if steps == max_new_tokens or bool(finished.all()):
                break
            input_ids = token[:, None]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(token), 1))], 1
            )
            position_ids = next_position
            next_position = next_position + 1
            # Rows that are done leave the batch once a quarter of it is (when the cache
            # can drop rows), so a few long answers do not keep the whole batch running.
            if 4 * int(finished.sum()) >= len(finished) and _cache_can(
                past, "batch_select_indices"
            ):
                keep = (~finished).nonzero().squeeze(-1)
                _cache_apply(past, "batch_select_indices", keep)
                active, finished, input_ids = active[keep], finished[keep], input_ids[keep]
                attention_mask, position_ids = attention_mask[keep], position_ids[keep]
                next_position = next_position[keep]
        eos_set = set(self.eos_ids)
        cut: list[list[int]] = []
        for row, length in zip(tokens[:, :steps].tolist(), lengths, strict=True):
            row = row[:length]  # not the pad slots after a row stopped
            end = next((j for j, t in enumerate(row) if t in eos_set), len(row))
            cut.append(row[:end])
        return cut

    def _shared_prefix_cache(self, rows: list[list[int]], extra: dict[str, Any]) -> tuple[int, Any]:
        """(length, cache) of the token prefix every row shares, prefilled once.

        The prefix stops one token short of the shortest row, so every row still feeds a
        token of its own. (0, None) when the prefix is short, the batch is a single row,
        or the model's cache cannot be repeated along the batch (then rows prefill alone).
        """
        shortest = min(len(r) for r in rows)
        shared = 0
        while shared < shortest - 1 and all(r[shared] == rows[0][shared] for r in rows):
            shared += 1
        if len(rows) < 2 or shared < MIN_SHARED_PREFIX:
            return 0, None
        ids = torch.tensor([rows[0][:shared]], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(shared, device=self.device)[None, :],
            use_cache=True,
            **{self._cache_kw: None},
            **extra,
        )
        cache = getattr(out, self._cache_kw)
        if not _cache_can(cache, "batch_repeat_interleave"):
            return 0, None
        _cache_apply(cache, "batch_repeat_interleave", len(rows))
        return shared, cache

    def _stopped(
        self, tokens: torch.Tensor, finished: torch.Tensor, stop: Sequence[str]
    ) -> torch.Tensor:
        """Rows not yet finished whose decoded new `tokens` have settled on a stop string."""
        hit = [
            not done and stop_settled(self.tokenizer.decode(row, **DECODE_KWARGS), stop)
            for row, done in zip(tokens.tolist(), finished.tolist(), strict=True)
        ]
        return torch.tensor(hit, dtype=torch.bool, device=finished.device)

    # ------------------------------------------------------------------ scoring
    def token_logprobs(
        self, texts: Sequence[str], with_stats: bool = False, *, desc: str | None = None
    ) -> list[TokenScores]:
        """Log-prob of every token after BOS of each text, optionally with Min-K%++ stats."""
        encoded, batches = self._scoring_batches(texts)
        results: list[TokenScores | None] = [None] * len(encoded)
        with _progress(len(encoded), desc) as bar, _eval_mode(self.model):
            for batch in batches:
                with LANE.foreground():
                    scores = self._score([encoded[i] for i in batch], with_stats)
                for i, s in zip(batch, scores, strict=True):
                    results[i] = s
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def submit_token_logprobs(
        self, texts: Sequence[str], with_stats: bool = False, *, desc: str | None = None
    ) -> ScoringJob[TokenScores] | Ready[list[TokenScores]]:
        """`token_logprobs`, run on the background lane (see `engines.background`).

        Returns a job whose `result()` gives the scores; meanwhile this thread can
        generate. Where background scoring does not pay (an accelerator, one CPU thread,
        `background_scoring=False`) the texts are scored now, with `desc` labelling the
        progress bar, and the result is ready.
        """
        if not (self.background_scoring and LANE.useful(self.device)):
            return Ready(self.token_logprobs(texts, with_stats, desc=desc))
        encoded, batches = self._scoring_batches(texts)

        def score(batch: list[int]) -> list[TokenScores]:
            with _eval_mode(self.model):
                return self._score([encoded[i] for i in batch], with_stats)

        return LANE.submit(ScoringJob(len(encoded), batches, score))

    def _scoring_batches(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """The token ids of each text (truncated to `max_length`) and the scoring batches."""
        encoded = encode_texts(self.tokenizer, texts)
        if self.max_length is not None:
            encoded = [ids[: self.max_length] for ids in encoded]
        lengths = [len(x) for x in encoded]
        return encoded, list(_length_sorted_batches(lengths, self.batch_size, self.score_tokens))

    @torch.inference_mode()
    def _score(self, rows: list[list[int]], with_stats: bool) -> list[TokenScores]:
        n, width = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        position_ids = torch.arange(width, device=self.device).expand(n, width)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **{self._cache_kw: None},
        ).logits
        out: list[TokenScores] = []
        for b, row in enumerate(rows):
            m = len(row) - 1  # tokens after BOS
            # One row at a time keeps the fp32 log-softmax at (length x vocab).
            logp = torch.log_softmax(logits[b, :m].float(), dim=-1)
            target = input_ids[b, 1 : m + 1, None]
            token_lp = logp.gather(-1, target).squeeze(-1)
            mean = std = None
            if with_stats:
                p = logp.exp()
                mu = (p * logp).sum(-1)
                var = (p * (logp - mu[:, None]).square()).sum(-1)
                mean = mu.double().cpu().numpy()
                std = var.clamp(min=0).sqrt().double().cpu().numpy()
            out.append(TokenScores(token_lp.double().cpu().numpy(), mean, std))
        return out
