"""The server's Prometheus metrics, in a registry of its own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a fast CPU step (a few ms on the embedded model) to GLM-130B-sized waits.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("glmc_requests", "HTTP requests answered, by endpoint and outcome "
                                "(ok, bad_request, overloaded, cancelled, error)", ["endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("glmc_prompt_tokens", "Prompt tokens read (each blank's context)", registry=r)
        self.generation_tokens = Counter("glmc_generation_tokens", "Tokens generated (every row of every step)",
                                         registry=r)
        self.queue_depth = Gauge("glmc_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("glmc_running_requests", "Requests with generations in the running batch", registry=r)
        self.batch_rows = Gauge("glmc_batch_rows", "Rows of the running batch (one per sample, one per beam)",
                                registry=r)
        self.time_to_first_token = Histogram("glmc_time_to_first_token_seconds", "From a request's arrival to "
                                             "its first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_token = Histogram("glmc_time_per_output_token_seconds", "Between consecutive tokens of "
                                        "one generation", buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("glmc_batch_step_seconds", "One step of the running batch (every "
                                      "generation's pick and one decode)", buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("glmc_request_duration_seconds", "From a request's arrival to its "
                                         "last byte", buckets=LATENCY_BUCKETS, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
