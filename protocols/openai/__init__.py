"""OpenAI completions and chat completions over any GenerationBackend (no torch here).

Routes call:

    await create_completion(backend, body, model_name=...)       # POST /openai/v1/completions
    await create_chat_completion(backend, body, model_name=...)  # POST /openai/v1/chat/completions

Each returns the OpenAI response dict, or, when the body has "stream": true, an async iterator of
SSE lines ("data: {chunk}\\n\\n" ... "data: [DONE]\\n\\n") to send with media type text/event-stream.
Every client mistake raises handlers.errors.InvalidInput (400) before anything is streamed; a full
queue raises Overloaded (429). An error after streaming began is sent as a `data: {"error": ...}`
event followed by [DONE], as vLLM does.

Default precedence for each sampling parameter: the request's value → the model's
generation_config.json (`backend.sampling_defaults`) → the OpenAI default. max_tokens defaults to 16
for completions (OpenAI's and KServe's default) and to the rest of the context for chat.

Differences from KServe's transformers backend (all compatible with its wire format): n > 1,
logprobs, top_k, stream_options.include_usage are honoured; stop strings are removed from the text;
finish_reason appears only on the last chunk of each choice. Parameters that cannot be honoured
(logit_bias, suffix, best_of != n, tools, non-text response_format, token-id prompts, ...) are
refused by name with a 400; unknown fields are accepted and logged.
"""

from protocols.openai.chat import create_chat_completion
from protocols.openai.completions import create_completion

__all__ = ["create_chat_completion", "create_completion"]
