"""python -m pprt.serve: an OpenAI-compatible HTTP server over the public API.

protocol.py       the request bodies (pydantic) and OpenAI's error object
tool_formats.py   the hermes (JSON) and XML tool-call formats
output_parser.py  generated text split, as it streams, into reasoning, content and tool calls
metrics.py        GET /metrics from LLM.stats() (prometheus-client)

Needs the `serve` extra (`pip install "pprt[serve]"`).
"""
