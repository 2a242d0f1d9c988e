"""Translation between provider APIs: OpenAI's chat API is the common form, and each other API
has one module that translates to and from it (requests, whole answers, streamed answers event by
event, errors, usage): `anthropic`, `gemini`, `bedrock` (Converse); Azure OpenAI speaks OpenAI's
bodies (`extproc.policy.provider_api` gives its paths and key). `openai_chunks` holds the common
form's pieces (chunks joined into one answer and split back, usage), `sse` reads server-sent
events out of arbitrary chunks, `requests` and `answers` pick the translation for a pair of APIs.

Pure functions and small stateful decoders over bytes and dicts; no Envoy, no I/O. Which requests
are translated is decided in `extproc.policy` (`provider_api`, `answer_format`); the data plane
calls these (`extproc.dataplane.body_rewrite`, `extproc.dataplane.answer_exchange`).
docs/translation.md says what each translation keeps, maps and drops.
"""
