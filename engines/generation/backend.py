"""The backend-neutral interface of text generation; no torch here, so protocols may import it.

A backend (transformers in `transformers/`, vLLM in `vllm_backend.py`) takes a
`GenerationRequest` (prompt token ids + `SamplingOptions`) and yields `GenerationOutput`s: one per
engine step in which at least one of the request's n choices made progress. Protocol code turns
requests into `GenerationRequest`s and outputs into OpenAI responses; it never sees torch.

Default precedence for every sampling field (written down once, applied by the protocol layer):
    1. the value in the request, when the client set it;
    2. the model's generation_config.json (`GenerationBackend.sampling_defaults`: temperature,
       top_p, top_k, min_p, repetition_penalty, max_tokens from max_new_tokens);
    3. the OpenAI default (the field defaults of `SamplingOptions` below; completions'
       max_tokens defaults to 16, chat's to the rest of the context).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]

# The SamplingOptions fields that a model's generation_config may supply (precedence level 2).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")

# Temperatures below this are greedy, as in vLLM (`_SAMPLING_EPS` in vllm/sampling_params.py): dividing the
# logits by 1e-45 overflows to inf and softmax gives NaN, which the sampler cannot draw from.
SAMPLING_EPS = 1e-5


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, applied token by token (vLLM's `structured_outputs` kinds)."""

    kind: StructuredKind
    """json: `spec` is a JSON schema; json_object: any JSON object; regex: `spec` is a regular expression;
    choice: `choices` lists the allowed texts; grammar: `spec` is an EBNF (GBNF) or Lark grammar."""
    spec: str = ""
    choices: tuple[str, ...] = ()
    any_whitespace: bool = True
    """JSON kinds: allow any whitespace between tokens (vLLM's disable_any_whitespace turns it off)."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample one request. Defaults are OpenAI's; ranges are checked by `validate()`."""

    max_tokens: int = 16
    """Most tokens to generate per choice (>= 1). finish_reason "length" when reached."""
    temperature: float = 1.0
    """Below SAMPLING_EPS (1e-5, like vLLM) = greedy (argmax); above, divides the logits before softmax.
    Range [0, 2] in OpenAI."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p, (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) = all (vLLM extra)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p x the top token's; 0 = off (vLLM extra)."""
    seed: int | None = None
    """Seeds this request's own random generator; same seed + same options = same output."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before them; they are not in the text (finish_reason "stop").
    A list is accepted and stored as a tuple."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a choice like eos does (vLLM extra)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text (vLLM extra)."""
    n: int = 1
    """Number of choices generated for the prompt (each its own sequence)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated, [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style multiplicative penalty on prompt and generated tokens; 1 = off (vLLM extra)."""
    logprobs: int | None = None
    """None = no logprobs; k >= 0 = the chosen token's logprob plus the k most likely alternatives
    (0 = only the chosen token's)."""
    prompt_logprobs: int | None = None
    """Like logprobs, for the prompt tokens (needed by completions' echo + logprobs)."""
    echo: bool = False
    """Completions: the response text starts with the prompt. Backends ignore it (the protocol
    layer prepends the prompt); it is here so `unsupported()` can judge echo + logprobs."""
    ignore_eos: bool = False
    """Keep generating past the eos token until max_tokens (benchmarks)."""
    min_tokens: int = 0
    """eos and stop token ids are not allowed before this many tokens (vLLM extra)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    structured: StructuredOutput | None = None
    """Constrain the text to a JSON schema, regex, choice or grammar (None = free text)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling, bias in [-100, 100] (OpenAI's)."""

    def __post_init__(self) -> None:
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self) -> str | None:
        """The name and problem of the first out-of-range field, or None when all are valid."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (all tokens) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("n", self.n >= 1, "must be at least 1"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0"),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "must be >= 0"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("seed", self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "must be within int64"),
        ]
        for name, ok, problem in checks:
            if not ok:
                return f"{name} {problem}"
        return None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class RequestPolicy:
    """What one request may ask for (server arguments of the same names); a backend that has no `policy`
    attribute gets these defaults."""

    max_tokens_limit: int = 8192
    """Largest max_tokens of one choice."""
    max_request_tokens: int = 32768
    """Largest n x max_tokens of one request."""
    max_top_logprobs: int = 20
    """Largest logprobs / top_logprobs / prompt_logprobs."""
    trust_request_chat_template: bool = False
    """Whether a request may bring its own chat template."""

    @classmethod
    def from_args(cls, args: Any) -> RequestPolicy:
        return cls(
            max_tokens_limit=args.max_tokens_limit,
            max_request_tokens=args.max_request_tokens,
            max_top_logprobs=args.max_top_logprobs,
            trust_request_chat_template=args.trust_request_chat_template,
        )

    def default_max_tokens(self, n: int) -> int:
        """The largest max_tokens this policy lets a request with n choices have."""
        return max(1, min(self.max_tokens_limit, self.max_request_tokens // max(n, 1)))

    def check(self, sampling: SamplingOptions) -> tuple[str, str] | None:
        """(field, problem) for the first limit the options pass, else None."""
        if sampling.max_tokens > self.max_tokens_limit:
            return "max_tokens", (
                f"max_tokens is {sampling.max_tokens}; this server allows at most {self.max_tokens_limit} "
                "(argument max_tokens_limit)"
            )
        if sampling.n * sampling.max_tokens > self.max_request_tokens:
            return "n", (
                f"n x max_tokens is {sampling.n} x {sampling.max_tokens} = {sampling.n * sampling.max_tokens}; this "
                f"server allows at most {self.max_request_tokens} per request (argument max_request_tokens)"
            )
        for name, value in (("logprobs", sampling.logprobs), ("prompt_logprobs", sampling.prompt_logprobs)):
            if value is not None and value > self.max_top_logprobs:
                return name, (
                    f"{name} is {value}; this server allows at most {self.max_top_logprobs} alternatives per token "
                    "(argument max_top_logprobs)"
                )
        return None


def policy_of(backend: object) -> RequestPolicy:
    policy = getattr(backend, "policy", None)
    return policy if isinstance(policy, RequestPolicy) else RequestPolicy()


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete n times."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_token_ids, tuple):
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))


@dataclass(frozen=True)
class Logprob:
    """One token and its log-probability."""

    token_id: int
    token: str
    """The token decoded on its own (may be a partial character, shown with U+FFFD)."""
    logprob: float
    rank: int | None = None
    """1 = the most likely token at its position (set for prompt logprobs, as vLLM reports them)."""


@dataclass(frozen=True)
class TokenLogprobs:
    """The logprob of one sampled (or prompt) token, and the most likely alternatives at its position.

    Logprobs are log_softmax of the model's raw logits (before temperature, penalties, top-k/top-p),
    as vLLM returns by default and OpenAI documents.
    """

    chosen: Logprob
    top: tuple[Logprob, ...] = ()
    """The `logprobs` most likely tokens, most likely first (may include the chosen one)."""


@dataclass(frozen=True)
class ChoiceDelta:
    """What one of the n choices produced since its previous delta."""

    index: int
    """Which choice (0 .. n-1)."""
    token_ids: tuple[int, ...]
    """New token ids, stop-string tokens included (they count as generated tokens)."""
    text: str
    """New text; a stop string (and what follows it) is excluded, and text that might start a stop
    string or is an incomplete character is held back until decided."""
    logprobs: tuple[TokenLogprobs, ...] | None = None
    """One entry per new token id when SamplingOptions.logprobs is set, else None."""
    finish_reason: FinishReason | None = None
    """None while running; "stop" for eos / stop string / stop token, "length" for max_tokens."""
    stop_reason: str | int | None = None
    """The stop string or token id that ended the choice (None for eos and length)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationOutput:
    """One step's progress of a request: only choices that produced something (or finished) appear."""

    request_id: str
    prompt_token_count: int
    choices: tuple[ChoiceDelta, ...]
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """Only in the first output, when SamplingOptions.prompt_logprobs is set: one entry per prompt
    token, None for the first (it has no context)."""
    finished: bool = False
    """True on the last output: every choice has a finish_reason."""


@runtime_checkable
class GenerationBackend(Protocol):
    """What a route needs from a text-generation engine.

    Life cycle: `await backend.start()` once (loads weights / starts the engine off the event loop),
    then any number of concurrent `generate()` calls, then `await backend.stop()`.
    """

    name: str
    """"huggingface" or "vllm"."""
    tokenizer: PreTrainedTokenizerBase
    """The model's tokenizer (for chat templates, prompt tokenization and usage counts)."""
    max_model_len: int
    """Longest prompt + generated tokens one sequence may have."""
    sampling_defaults: Mapping[str, Any]
    """SamplingOptions fields set by the model's generation_config (precedence level 2)."""

    def unsupported(self, sampling: SamplingOptions) -> str | None:
        """The name of an option this backend cannot honour (the route answers 400), else None."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream the request's progress; the last output has finished=True.

        An async generator: cancelling the task that iterates it (or closing it) aborts the request
        and frees its slot within a second. Raises handlers.errors.Overloaded when the waiting queue
        is full and InvalidInput for a request the model cannot run.
        """
        ...

    async def start(self) -> None:
        """Load the model and start the engine; returns when it can generate."""
        ...

    async def stop(self) -> None:
        """Abort running requests and release the engine."""
        ...


def check_sampling(backend: GenerationBackend, sampling: SamplingOptions) -> None:
    """InvalidInput (400) naming the first option that is out of range or that `backend` cannot honour."""
    from handlers.errors import InvalidInput

    problem = sampling.validate()
    if problem:
        raise InvalidInput(problem, param=problem.split()[0])
    limit = policy_of(backend).check(sampling)
    if limit:
        raise InvalidInput(limit[1], param=limit[0])
    if sampling.structured is not None and not getattr(backend, "supports_structured_outputs", False):
        raise InvalidInput(
            f"structured outputs are not supported by the {backend.name} backend here", param="structured_outputs"
        )
    if sampling.logit_bias and not getattr(backend, "supports_logit_bias", False):
        raise InvalidInput(f"'logit_bias' is not supported by the {backend.name} backend here", param="logit_bias")
    name = backend.unsupported(sampling)
    if name:
        raise InvalidInput(f"'{name}' is not supported by the {backend.name} backend", param=name)
