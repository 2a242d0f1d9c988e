"""The answer reader: what Envoy's JSON and event-stream readers cannot take out of an answer,
for spans (docs/tracing.md): the finish reason, and where contents are captured, the answer's
first bytes.

`json_to_metadata` and `sse_to_metadata` select by object keys only: neither indexes an array,
and OpenAI's answers carry the finish reason in `choices[0].finish_reason` (every event of a
stream has a `choices` array). This is a Lua filter (Envoy's, in C with LuaJIT) that looks for
the first `"finish_reason": "<word>"` in the answer as it passes: two plain searches on each
chunk (and on the previous chunk's end with this one's start, so a field split across chunks is
still found), the pattern match only where one hits, nothing buffered, the answer streamed on as
it comes. A `null` finish reason (every event but the last)
does not match a quoted word; nor does the field's name inside generated text (its quotes are
escaped there).

Only sampled requests are read (the ext_proc wrote their `span_id`): the filter is off unless
traces are exported, turned on by the gateway's routes (`enabled`), so a gateway without an
exporter pays nothing, and one with an exporter pays one metadata lookup for the answers of
requests it does not sample. With `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`, the
`contents` script also keeps the answer's first `SAMPLE_BYTES` bytes as the request's
`answer_sample` metadata, which the access-log receiver parses and masks before any span sees it
(`extproc.dataplane.trace_contents`).
"""

from __future__ import annotations

from ..protocol import ANSWER_SAMPLE_KEY, FINISH_REASON_KEY, METADATA_NAMESPACE

ANSWER_READER = "llm_gateway.answer_reader"
FINISH = "finish"  # the script that reads the finish reason
CONTENTS = "contents"  # the same, and the answer's first bytes
SAMPLE_BYTES = 16384  # what `contents` keeps of an answer, at most

_READ = """
local NS = "@NS@"
local find, match = string.find, string.match
local function finish_in(piece)
  if find(piece, '_reason":"', 1, true) or find(piece, '_reason": "', 1, true) then
    return match(piece, '"finish_reason"%s*:%s*"([%w_%-]+)"')
  end
  return nil
end
local function read(handle, keep)
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if meta == nil or meta["span_id"] == nil then return end  -- not sampled: nothing to read
  local found, tail, kept, size = nil, "", {}, 0
  for chunk in handle:bodyChunks() do
    if found == nil or (keep and size < @SAMPLE@) then
      local text = chunk:getBytes(0, chunk:length())
      if found == nil then
        -- plain searches first (a null finish reason, in every event but the last, matches neither),
        -- the pattern only where one hits; across the previous chunk's end only its last bytes
        found = finish_in(tail .. string.sub(text, 1, 64)) or finish_in(text)
        if found ~= nil then
          handle:streamInfo():dynamicMetadata():set(NS, "@FINISH@", found)
        end
        tail = string.sub(text, -64)
      end
      if keep and size < @SAMPLE@ then
        kept[#kept + 1] = string.sub(text, 1, @SAMPLE@ - size)
        size = size + #kept[#kept]
      end
    end
  end
  if keep and size > 0 then
    handle:streamInfo():dynamicMetadata():set(NS, "@SAMPLE_KEY@", table.concat(kept))
  end
end
""".replace("@NS@", METADATA_NAMESPACE).replace("@SAMPLE@", str(SAMPLE_BYTES)).replace(
    "@FINISH@", FINISH_REASON_KEY).replace("@SAMPLE_KEY@", ANSWER_SAMPLE_KEY)

SCRIPTS = {
    FINISH: _READ + "function envoy_on_response(handle) read(handle, false) end\n",
    CONTENTS: _READ + "function envoy_on_response(handle) read(handle, true) end\n",
}


def answer_reader() -> dict:
    """The filter of the listener's chain, off until a route turns it on (`enabled`)."""
    return {"name": ANSWER_READER, "disabled": True, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "source_codes": {name: {"inline_string": code} for name, code in SCRIPTS.items()},
        "stat_prefix": "answer_reader",
    }}


def enabled(script: str) -> dict:
    """The per-route (here: per virtual host) config that turns the reader on with `script`."""
    return {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": False,
            "config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute",
                       "name": script}}
