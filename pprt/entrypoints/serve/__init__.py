"""python -m pprt.serve: an OpenAI-compatible HTTP server over the public API.

cli.py            the command line: models (one per card), host, key, limits; runs uvicorn
models.py         the served models, each an LLM on its own devices; failed ones answer 503
app.py            the Starlette app: routes, bearer token, body limit, errors, disconnects
generation.py     /v1/completions and /v1/chat/completions: engine outputs to OpenAI answers
run.py            one HTTP request's engine requests: sampling, admission, submission, latency metrics
chat.py           a chat request rendered through the model's template (tools, tool_choice)
output_parser.py  generated text split, as it streams, into reasoning, content and tool calls
tool_formats.py   the hermes (JSON) and XML tool-call formats
protocol.py       the request bodies (pydantic) and OpenAI's error object
responses.py      the answers' JSON shapes (objects, chunks, logprobs)
metrics.py        GET /metrics from LLM.stats() (prometheus-client)

Needs the `serve` extra (`pip install "pprt[serve]"`).
"""
