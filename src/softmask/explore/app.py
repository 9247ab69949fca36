"""The web side of ``softmask explore``: a FastAPI application around an
:class:`~softmask.explore.session.Explorer`, and the server that runs it (uvicorn).

Routes (JSON unless said otherwise):

- ``GET /``: the page (``page.html``, no external resources: it works offline).
- ``GET /api/info``: the models, the gallery's image names, the Grad-CAM sources.
- ``GET /api/thumbnail?name=N``: a PNG thumbnail of a gallery image (names the gallery lists only).
- ``POST /api/upload`` (multipart, field ``file``): ``{"image_id", "preview"}``.
- ``POST /api/analyse`` ``{"image", "caption", "layer", "source"}``: scores and per-word overlays.
- ``POST /api/retrieve`` ``{"caption"}``: each model's top gallery images.

A request the user got wrong answers 400 with ``{"error": message}``; anything else 500 with a
one-line ``{"error": ...}`` (the traceback goes to the server's log, never to the page). Every answer
of ``analyse`` and ``retrieve`` carries ``elapsed_ms``, the server's time for it.
"""

from __future__ import annotations

import functools
import io
import logging
import socket
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from softmask.config import ConfigError
from softmask.explore.session import MAX_UPLOAD_BYTES, ExploreError, Explorer, jpeg_data_uri

log = logging.getLogger("softmask")

PAGE = Path(__file__).with_name("page.html")
THUMBNAIL_SIDE = 160
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(explorer: Explorer):
    """The FastAPI application serving ``explorer``."""
    app = FastAPI(title="softmask explore", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ExploreError)
    async def user_error(request: Request, exc: ExploreError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": f"malformed request to {request.url.path}: {problems}"}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception(f"softmask explore: {request.url.path} failed")
        return JSONResponse({"error": f"the server failed on this request ({type(exc).__name__}: {exc}); "
                                      "its log has the details"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/info")
    def info():
        return explorer.info()

    @functools.lru_cache(maxsize=1024)
    def thumbnail_png(name: str) -> bytes:
        image = explorer.image(name).convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    @app.get("/api/thumbnail")
    def thumbnail(name: str):
        try:
            return Response(thumbnail_png(name), media_type="image/png")
        except ExploreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

    @app.post("/api/upload")
    def upload(file: UploadFile):
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        image_id = explorer.add_upload(data, file.filename or "upload")
        preview = explorer.image(image_id).convert("RGB")
        preview.thumbnail((THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE * 2))
        return {"image_id": image_id, "preview": jpeg_data_uri(np.asarray(preview))}

    @app.post("/api/analyse")
    def analyse(request: dict):
        start = time.perf_counter()
        layer = request.get("layer")
        out = explorer.analyse(str(request.get("image", "")), str(request.get("caption", "")),
                               None if layer in (None, "", "default") else _layer(layer),
                               str(request.get("source", "gradcam")))
        out["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
        return out

    @app.post("/api/retrieve")
    def retrieve(request: dict):
        start = time.perf_counter()
        out = explorer.retrieve(str(request.get("caption", "")))
        out["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
        return out

    return app


def _layer(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ExploreError(f"the layer must be a whole number, got {value!r}") from None


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        ConfigError: the port is in use or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "; pass --port 0 for a free port" if exc.errno in (98, 48) else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.listen(128)
    return sock


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the page until Ctrl-C (or SIGTERM); prints the address first, on its own line."""
    import uvicorn

    sock = open_socket(host, port)
    bound = sock.getsockname()[1]
    if host not in LOOPBACK:
        log.warning(f"softmask explore listens on {host}: anyone who can reach this machine can use the page "
                    "(it has no login); the default --host 127.0.0.1 keeps it to this machine")
    shown = f"[{host}]" if ":" in host else host
    print(f"softmask explore: http://{shown}:{bound}/  (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(create_app(explorer), log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
