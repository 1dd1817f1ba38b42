"""Quality of an artifact: perplexity on a text, and agreement with the unquantized source.

- perplexity: teacher-forced over a sliding window of `context` tokens moved by `stride`; every
  window starts from an empty KV cache and scores only the tokens the previous one did not (the
  first window scores all of its tokens), so each token is predicted from up to `context` tokens.
- reference: another engine on the same windows (edgellm.compiler.check builds it: the source
  checkpoint as fp32 weights with an fp32 hidden state, run by the numpy reference engine); the
  share of positions whose top-1 token is the same, and the mean KL divergence
  KL(reference || artifact) of the next-token distributions.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from edgellm.errors import EdgeLLMError

# For `build --check-level 2` and `eval` without --text: a short public-domain passage
# (the opening of the US Declaration of Independence).
SHORT_TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another, and to assume among the powers of "
    "the earth, the separate and equal station to which the Laws of Nature and of Nature's God "
    "entitle them, a decent respect to the opinions of mankind requires that they should declare "
    "the causes which impel them to the separation. We hold these truths to be self-evident, that "
    "all men are created equal, that they are endowed by their Creator with certain unalienable "
    "Rights, that among these are Life, Liberty and the pursuit of Happiness."
)


@dataclass
class Quality:
    tokens: int  # positions scored
    context: int
    stride: int
    perplexity: float
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    mean_kl: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def summary(self) -> str:
        line = (f"perplexity {self.perplexity:.4f} over {self.tokens} tokens "
                f"(context {self.context}, stride {self.stride})")
        if self.reference_perplexity is not None:
            change = self.perplexity / self.reference_perplexity - 1
            line += (f"; unquantized reference {self.reference_perplexity:.4f} "
                     f"({change * 100:+.2f}%); top-1 agreement {self.top1_agreement * 100:.2f}%; "
                     f"mean KL {self.mean_kl:.5f} nats")
        return line


def _windows(n: int, context: int, stride: int):
    """(start, end, row): windows ids[start:end] of up to `context` tokens; the logits rows from
    `row` on predict the tokens not scored by an earlier window."""
    next_target = 1  # the first token not yet scored
    while next_target < n:
        end = min(context, n) if next_target == 1 else min(next_target + stride, n)
        start = max(0, end - context)
        yield start, end, next_target - start - 1
        next_target = end


def _window_logits(engine, ids: list[int]) -> np.ndarray:
    step = engine.prefill_len
    return np.concatenate([engine.forward(ids[s:s + step], s, all_logits=True)
                           for s in range(0, len(ids), step)]).astype(np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def window_log_probs(engine, window: list[int], row: int) -> np.ndarray:
    """Next-token log-probabilities of a window's logits rows from `row` on (see _windows)."""
    return _log_softmax(_window_logits(engine, window)[row:len(window) - 1])


def token_nll(log_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -log_probs[np.arange(len(targets)), targets]


def token_kl(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(reference || ours) of each row's next-token distribution."""
    return (np.exp(ref) * (ref - ours)).sum(-1)


def evaluate(engine, ids: list[int], context: int | None = None, stride: int | None = None,
             reference=None) -> Quality:
    """Perplexity of `engine` on ids (and agreement with the `reference` engine, if given)."""
    context = min(context or engine.kv_cache_len, engine.kv_cache_len)
    if reference is not None:
        context = min(context, reference.kv_cache_len)
    stride = stride or max(1, context // 2)
    if len(ids) < 2:
        raise EdgeLLMError("the text is too short to evaluate (fewer than 2 tokens)")
    if not 1 <= stride < context:
        raise EdgeLLMError(f"--stride must be between 1 and the context - 1 ({context - 1})")
    nll, ref_nll, agree, kl = [], [], [], []
    windows = list(_windows(len(ids), context, stride))
    what = "the artifact and the reference" if reference is not None else "the artifact"
    for start, end, first in tqdm(windows, desc=f"eval: {len(ids)} tokens on {what}",
                                  unit="window", file=sys.stderr, disable=None, leave=False):
        window = ids[start:end]
        targets = np.asarray(window[first + 1:])
        ours = window_log_probs(engine, window, first)
        nll.extend(token_nll(ours, targets))
        if reference is not None:
            ref = window_log_probs(reference, window, first)
            ref_nll.extend(token_nll(ref, targets))
            agree.extend(ours.argmax(-1) == ref.argmax(-1))
            kl.extend(token_kl(ref, ours))
    quality = Quality(len(nll), context, stride, float(np.exp(np.mean(nll))))
    if reference is not None:
        quality.reference_perplexity = float(np.exp(np.mean(ref_nll)))
        quality.top1_agreement = float(np.mean(agree))
        quality.mean_kl = float(np.mean(kl))
    return quality
