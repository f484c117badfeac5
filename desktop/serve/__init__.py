"""``specd serve``: the edge client behind an OpenAI- and Ollama-compatible HTTP API on this machine.

``wire`` reads requests and writes each API's answers, ``errors`` the errors in each API's shape,
``stops`` matches stop sequences in streamed text, ``pool`` lends edge clients to requests, ``answering``
runs one answer on a lent client, ``openai_routes`` and ``ollama_routes`` are the two APIs, and ``app``
puts them on Starlette and uvicorn (used by the command and by the tray app).
"""
