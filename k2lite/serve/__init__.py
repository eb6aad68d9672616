"""`k2lite serve`: an OpenAI-compatible HTTP server with continuous batching, and its chat page.

    k2lite serve -m DIR_OR_ORG/NAME --host 127.0.0.1 --port 8000 --max-batch 8 --context 8192 \
                 [--api-key KEY]                          (= python -m k2lite serve ...)

Three layers, each its own module:
  scheduler.py  continuous batching over the paged latent cache and the prompt cache: the one
                thread that runs the model; Requests in, deltas out (no HTTP in it)
  api.py        OpenAI's request and response shapes: validation of bodies into Requests,
                usage, errors (ApiError) and the HTTP statuses of the scheduler's refusals
  transport.py  HTTP on Starlette + uvicorn (the optional extra `pip install "k2lite[serve]"`):
                routes, SSE, API keys, the chat page (static/chat.html); metrics.py: /metrics
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("k2lite.server")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(llm, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, *,
          max_queue: int | None = None, model_name=None, chat_template_kwargs: dict | None = None,
          default_max_tokens: int | None = None, api_keys=None, max_connections: int = 1024,
          block: bool = True):
    """Serve a loaded LLM (its context and cache are sized where it is loaded: `k2lite serve`).
    block=False returns the started Server (`.url`, `.scheduler`, `.stop()`); block=True serves
    until Ctrl-C or SIGTERM. model_name: the id clients send (a list: the first is reported,
    all are accepted); api_keys: keys of which `Authorization: Bearer` must carry one (None or
    empty: no check); chat_template_kwargs: template variables of every chat request, under the
    request's own. Needs `pip install "k2lite[serve]"`."""
    from .transport import Server         # starlette + uvicorn: the optional extra
    names = [model_name] if isinstance(model_name, str) else list(model_name or [])
    srv = Server(llm, host, port, max_batch, max_queue, names, chat_template_kwargs, default_max_tokens,
                 api_keys=api_keys, max_connections=max_connections)
    if not block:
        return srv.start()
    if not logging.getLogger().handlers:     # called as a library (the click CLI): still log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)     # `docker stop`, systemd: shut down like Ctrl-C
    if not srv.api_keys and srv.exposed():
        log.warning("listening on %s without an API key: anyone who can reach it can use it "
                    "(--api-key KEY or K2LITE_API_KEY)", host)
    log.info("k2lite serving %s on %s (max batch %d, context %d)", srv.model_name, srv.url, max_batch, llm.context)
    try:
        srv.run()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return srv
