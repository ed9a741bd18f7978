"""GET /metrics: Prometheus text (prometheus-client), names prefixed ``chatrlhf_`` and modelled on vLLM's. One
registry per app, so two apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: a timestamp per label set that dashboards do not use

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ROUTES = ("/v1/chat/completions", "/v1/feedback", "/v1/models", "/health", "/metrics", "/chat", "/admin/reload")


class Metrics:
    """``engines()``: the engines running now (the served one, and swapped-out ones until their last request ends)."""

    def __init__(self, engines):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("chatrlhf_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter("chatrlhf_request_success", "Replies finished, by finish reason "
                                "(stop, length, cancelled, error)", ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("chatrlhf_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("chatrlhf_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("chatrlhf_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("chatrlhf_e2e_request_latency_seconds", "From request arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.store_errors = Counter("chatrlhf_feedback_store_errors", "Completions that --feedback-db failed to "
                                    "store (the server log says why; the client got its reply)", registry=r)
        self.reloads = Counter("chatrlhf_model_reloads", "POST /admin/reload by result (swapped, refused, failed)",
                               ["result"], registry=r)
        Gauge("chatrlhf_requests_running", "Rows in the engines' batches", registry=r).set_function(
            lambda: sum(e.running for e in engines()))
        Gauge("chatrlhf_requests_waiting", "Replies queued for a row of a batch", registry=r).set_function(
            lambda: sum(e.waiting for e in engines()))
        Gauge("chatrlhf_engines", "Engines running: 1, and the swapped-out one while its last requests finish after "
              "a hot swap", registry=r).set_function(lambda: len(engines()))

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class CountStatus:
    """ASGI middleware: every HTTP response counted by route and status (401s and 429s included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting(message):
            if message["type"] == "http.response.start":
                self.metrics.count(scope["path"], message["status"])
            await send(message)

        return await self.app(scope, receive, counting)
