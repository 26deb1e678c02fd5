"""The vLLM engine (optional, GPU only): same interface as the hf engine, faster decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from muse_bench.core.errors import ConfigError
from muse_bench.engines.base import DECODE_KWARGS, ENGINES, TokenScores, encode_texts, fit_prompt

VLLM_MISSING = "--engine vllm needs vLLM: pip install 'muse-bench[vllm]' (GPU only)."


@ENGINES.register("vllm")
class VLLMEngine:
    """Greedy generation and prompt log-probs through vLLM, from a model directory.

    Prompts and texts are tokenized with this engine's tokenizer (with BOS) and passed to
    vLLM as token ids, and generations are decoded with the same tokenizer, so inputs and
    outputs match the hf engine's token for token. vLLM only loads models from disk: an
    in-memory `model` (for example an inference-time unlearner) needs the hf engine.

    `token_logprobs(with_stats=True)` is not supported (vLLM returns top-k log-probs, not
    the whole next-token distribution that Min-K%++ needs) and raises ConfigError;
    `supports_stats` is False so the evaluator skips Min-K%++ attacks.
    """

    supports_stats = False

    def __init__(
        self,
        *,
        model: Any = None,
        tokenizer: Any = None,
        model_path: str | None = None,
        device: str = "cuda",
        batch_size: int = 32,
        max_length: int | None = None,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.85,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise ConfigError(VLLM_MISSING) from None
        if model is not None and not isinstance(model, str):
            raise ConfigError(
                "the vllm engine loads models from a directory; pass model_path, or use "
                "--engine hf for an in-memory model."
            )
        model_path = model_path or model
        if model_path is None:
            raise ConfigError("the vllm engine needs a model_path.")
        if device.startswith("cpu"):
            raise ConfigError("--engine vllm runs on a GPU only; use --engine hf on CPU.")
        if tokenizer is None:
            from muse_bench.core.models import load_tokenizer

            tokenizer = load_tokenizer(model_path)
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # vLLM schedules its own batches; kept for the interface
        self.llm = vllm.LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=dtype,
            max_model_len=max_length,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=0,
        )
        self.max_length = max_length or self.llm.llm_engine.model_config.max_model_len
        self.eos_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}

    def _prompts(self, ids: list[list[int]]) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": x} for x in ids]

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        desc: str | None = None,
    ) -> list[str]:
        """Greedy-decode up to `max_new_tokens` after each prompt; return the new text only.

        `stop` is accepted but not passed to vLLM: vLLM cuts at the first stop string it
        detects, which for some stop sets is not the earliest one to start, and continuous
        batching already keeps finished rows from costing steps.
        """
        if max_new_tokens <= 0:
            return ["" for _ in prompts]
        bos = self.tokenizer.bos_token_id
        ids = [
            fit_prompt(x, bos, self.max_length, max_new_tokens)
            for x in encode_texts(self.tokenizer, prompts)
        ]
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(self._prompts(ids), params, use_tqdm=desc is not None)
        texts = []
        for out in outputs:
            toks = list(out.outputs[0].token_ids)
            end = next((j for j, t in enumerate(toks) if t in self.eos_ids), len(toks))
            texts.append(self.tokenizer.decode(toks[:end], **DECODE_KWARGS))
        return texts

    def token_logprobs(
        self, texts: Sequence[str], with_stats: bool = False, *, desc: str | None = None
    ) -> list[TokenScores]:
        """Log-prob of every token after BOS of each text (no Min-K%++ stats)."""
        if with_stats:
            raise ConfigError(
                "the vllm engine cannot compute Min-K%++ statistics; use --engine hf "
                "for min_k_plus_plus attacks."
            )
        ids = [x[: self.max_length] for x in encode_texts(self.tokenizer, texts)]
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate(self._prompts(ids), params, use_tqdm=desc is not None)
        result = []
        for row, out in zip(ids, outputs, strict=True):
            # prompt_logprobs[0] is None (BOS has no context); each later entry maps token
            # ids to Logprob objects and always includes the prompt's own token.
            lps = [
                float(pos[tok].logprob)
                for tok, pos in zip(row[1:], out.prompt_logprobs[1:], strict=True)
            ]
            result.append(TokenScores(np.asarray(lps, dtype=np.float64)))
        return result
