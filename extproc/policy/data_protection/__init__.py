"""Data protection (`LLMDataPolicy`): what may leave the mesh in a prompt, and come back in an answer.

`detectors` finds sensitive text (built-ins with checksums, RE2 regexes, keywords), `scanner`
runs a set of detectors over a text in linear time (and over a stream, holding back only the
longest possible match), `prompts` finds every place a request's body carries prompt text,
`answers` every place an answer carries a model's text, `policy` decides which rules apply and
which action wins, `judge` asks a private model.
"""
