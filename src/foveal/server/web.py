"""The web chat page: static HTML, CSS and JavaScript modules shipped in the package (server/web/).

Design decisions:
- `GET /` answers a browser (an Accept header naming text/html) with the page and everyone else with
  the plain "foveal is running" that Ollama's clients and health checks expect; `/web/` is the page
  whatever the Accept header, and `/web/<file>` its assets.
- The page talks only to the public API (/api/tags, /api/chat), so it needs no route of its own and
  holds no data. That is why the page and its assets are open without the API key
  (`is_public_page`, read by the Guard): they are the same bytes for everyone. Every route that
  answers with data still needs the key; the page asks for it and sends it as a Bearer header.
- Only the files in the package folder are served, looked up by exact name in a table built at
  start-up: no path from the URL ever reaches the file system.
- Each answer carries a Content-Security-Policy that allows scripts, styles and connections from
  this origin only (no inline script, no eval, no other host), images also from data:/blob: URLs
  (the thumbnails of attached images), and no framing.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from .errors import APIError

router = APIRouter(include_in_schema=False)

PREFIX = "/web/"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache"}


def _load_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("foveal.server") / "web"
    files = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if item.is_file() and suffix in CONTENT_TYPES:
            files[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
    if "index.html" not in files:
        raise RuntimeError(f"the web page is missing from the package ({folder}/index.html)")
    return files


FILES = _load_files()


def is_public_page(method: str, path: str) -> bool:
    """The static page and its assets: served without the API key (they hold no data)."""
    return method in ("GET", "HEAD") and (path in ("/", "/web") or path.startswith(PREFIX))


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "").lower()


def _file(name: str, head: bool = False) -> Response:
    found = FILES.get(name)
    if found is None:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise APIError(404, f"no such file of the web page: {shown!r}", "not_found")
    body, ctype = found
    headers = dict(HEADERS)
    if head:
        headers["Content-Length"] = str(len(body))
    return Response(b"" if head else body, media_type=ctype, headers=headers)


@router.get("/")
async def root(request: Request):
    if wants_html(request):
        return _file("index.html")
    return PlainTextResponse("foveal is running")


@router.head("/")
async def root_head(request: Request):
    if wants_html(request):
        return _file("index.html", head=True)
    return Response(media_type="text/plain")


@router.get("/web")
async def web_bare():
    return Response(status_code=308, headers={"Location": PREFIX})


@router.get(PREFIX)
async def page():
    return _file("index.html")


@router.head(PREFIX)
async def page_head():
    return _file("index.html", head=True)


@router.get(PREFIX + "{name}")
async def asset(name: str):
    return _file(name)


@router.head(PREFIX + "{name}")
async def asset_head(name: str):
    return _file(name, head=True)
