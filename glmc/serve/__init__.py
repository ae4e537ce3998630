"""`glmc serve`: an OpenAI-compatible HTTP server over one model, with continuous batching.

    protocol  the requests' JSON checked into frozen values, OpenAI's response and error shapes
    text      a completion's text as it streams: stable prefixes only, stop strings cut
    engine    the thread that owns the model: requests join and leave one running Batch
    metrics   Prometheus counters, gauges and histograms, in a registry of the server's own
    app       the FastAPI routes: /v1/completions, /v1/generate, /v1/models, /health, /metrics
    server    uvicorn around the app: bounded bodies, draining on SIGINT/SIGTERM, the exit status
"""
