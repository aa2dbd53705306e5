"""The dashboard's web app: server-rendered pages (FastAPI + Jinja2), one small script.

Decisions:

- Pages are rendered on the server from ``reads`` records; plots are inline SVG. The one script
  (``static/dashboard.js``) re-fetches a live page every few seconds and swaps its ``<main>``.
  A strict Content-Security-Policy (same-origin scripts and styles only, no inline script)
  holds because nothing is inline but SVG markup.
- Authentication: with an admin token, every page but ``/login`` and ``/healthz`` needs a
  session cookie (made by posting the token to ``/login``) or ``Authorization: Bearer TOKEN``;
  otherwise 401. Without a token (loopback only, see ``server``) the Host header must name a
  loopback host, so a web page elsewhere cannot reach the dashboard by DNS rebinding.
- Mutations (mint a token, revoke a node) are POSTs carrying a CSRF token that must equal the
  browser's ``offsite_csrf`` cookie (double submit; the cookie is SameSite=Strict and
  HttpOnly), with a same-origin ``Origin`` when the browser sends one. A revoke goes through a
  confirmation page. Both are written to the coordinator's audit log by the source.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from coordinator.dashboard.reads import DashboardError, Source, file_links

SESSION_COOKIE = "offsite_session"
CSRF_COOKIE = "offsite_csrf"
OPEN_PATHS = ("/login", "/healthz", "/static/")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
LIVE_SECONDS = 5
SESSION_SECONDS = 12 * 3600.0  # a sign-in lasts a working day
MAX_FORM = 16 * 1024  # bytes; our forms hold a token, a name, a number
PAGE_SIZE = 100  # rows of a long table per page: 1,000 nodes stay a fast page
T = TypeVar("T")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript"}


@dataclass(frozen=True)
class Pager:
    """One page of a long table (nodes, artifacts) and the links to the others."""

    page: int
    pages: int
    total: int
    query: str

    def link(self, page: int) -> str:
        return "?" + urlencode({"page": page, **({"q": self.query} if self.query else {})})


def paged(items: Sequence[T], request: Request, size: int = PAGE_SIZE) -> tuple[list[T], Pager]:
    """The ``?page=`` slice of ``items`` (pages count from 1; out of range: the nearest)."""
    pages = max(1, -(-len(items) // size))
    try:
        page = min(max(1, int(request.query_params.get("page", "1"))), pages)
    except ValueError:
        page = 1
    query = request.query_params.get("q", "")
    return list(items[(page - 1) * size : page * size]), Pager(page, pages, len(items), query)


def _size(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("coordinator.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=_size, number=_number, when=_when)
    return env


def _host_name(host: str) -> str:
    """The host part of a Host header value (``[::1]:8080`` → ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def build_app(source: Source, token: str | None = None, secure: bool = False) -> FastAPI:
    """The dashboard over ``source``; ``token`` is the admin token (None: loopback, no login);
    ``secure`` marks cookies Secure (served over TLS)."""
    app = FastAPI(title="Offsite dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    env = _environment()
    sessions: dict[str, float] = {}  # session id -> when it expires (monotonic seconds)

    def authenticated(request: Request) -> bool:
        if token is None:
            return True
        expires = sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if expires is not None and time.monotonic() < expires:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())

    def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        values: dict[str, Any] = {
            "title": source.title,
            "csrf": request.state.csrf,
            "path": request.url.path,
            "login": token is not None,
            "live": 0,
        }
        page = env.get_template(template).render({**values, **context})
        return HTMLResponse(page, status_code=status)

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        host = _host_name(request.headers.get("host", ""))
        request.state.csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        response: Response
        if token is None and host not in LOOPBACK_HOSTS:
            response = Response("this dashboard answers loopback host names only", 421)
        elif not path.startswith(OPEN_PATHS) and not authenticated(request):
            response = render(request, "login.html", status=401, error="")
            response.headers["WWW-Authenticate"] = 'Bearer realm="offsite-dashboard"'
        elif request.method == "POST" and not path.startswith("/login") and not _csrf_ok(request):
            response = render(
                request,
                "message.html",
                status=403,
                heading="Refused",
                text="CSRF check failed; reload the page and try again.",
            )
        else:
            response = await call_next(request)
        if CSRF_COOKIE not in request.cookies:
            response.set_cookie(
                CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict", secure=secure
            )
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if not path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def _csrf_ok(request: Request) -> bool:
        form = getattr(request.state, "form", None)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        given = (form or {}).get("csrf", "")
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            return False
        return bool(cookie) and hmac.compare_digest(cookie.encode(), given.encode())

    async def form(request: Request) -> dict[str, str] | None:
        """The POSTed form; None when it is larger than a form of ours can be."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return None
        text = body.decode("utf-8", errors="replace")
        return {k: v[0] for k, v in parse_qs(text).items()}

    @app.middleware("http")
    async def read_form(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # runs before ``guard`` (middleware added last runs first): the CSRF check needs the form
        found = await form(request) if request.method == "POST" else {}
        if found is None:
            return Response("form too large", 413)
        request.state.form = found
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", media_type="text/plain")

    @app.get("/login")
    def login_page(request: Request) -> Response:
        if token is None:
            return RedirectResponse("/runs", 303)
        return render(request, "login.html", error="")

    @app.post("/login")
    def login(request: Request) -> Response:
        given = request.state.form.get("token", "")
        if token is None:
            return RedirectResponse("/runs", 303)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return render(request, "login.html", status=401, error="wrong admin token")
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        for stale in [k for k, v in sessions.items() if v <= now]:
            del sessions[stale]
        sessions[session] = now + SESSION_SECONDS
        response = RedirectResponse("/runs", 303)
        response.set_cookie(
            SESSION_COOKIE,
            session,
            max_age=int(SESSION_SECONDS),
            httponly=True,
            samesite="strict",
            secure=secure,
        )
        return response

    @app.get("/")
    def index() -> Response:
        return RedirectResponse("/runs", 303)

    @app.get("/nodes")
    def nodes(request: Request) -> Response:
        page = source.nodes()
        query = request.query_params.get("q", "").strip().lower()
        chosen = [
            n
            for n in page.nodes
            if not query or query in n.name.lower() or query in (n.status, n.superlink)
        ]
        rows, pager = paged(chosen, request)
        counts = {
            "enrolled": sum(n.status == "active" for n in page.nodes),
            "revoked": sum(n.status == "revoked" for n in page.nodes),
            "online": sum(n.superlink == "online" for n in page.nodes),
        }
        return render(
            request,
            "nodes.html",
            page=page,
            rows=rows,
            pager=pager,
            counts=counts,
            live=LIVE_SECONDS * 2 if page.serving else 0,
            revoked=request.query_params.get("revoked", ""),
        )

    @app.post("/nodes/token")
    def mint(request: Request) -> Response:
        try:
            hours = float(request.state.form.get("hours", "24"))
            minted = source.mint_token(hours)
        except (ValueError, DashboardError) as err:
            return render(request, "message.html", 400, heading="Refused", text=str(err))
        return render(request, "token.html", token=minted, hours=hours)

    @app.get("/nodes/{name}/revoke")
    def confirm_revoke(request: Request, name: str) -> Response:
        return render(request, "confirm.html", name=name)

    @app.post("/nodes/{name}/revoke")
    def revoke(request: Request, name: str) -> Response:
        if request.state.form.get("confirm") != name:
            return render(request, "message.html", 400, heading="Refused", text="not confirmed")
        try:
            source.revoke(name)
        except DashboardError as err:
            return render(request, "message.html", 400, heading="Refused", text=str(err))
        return RedirectResponse(f"/nodes?revoked={quote(name)}", 303)

    @app.get("/runs")
    def runs(request: Request) -> Response:
        found = source.runs()
        live = LIVE_SECONDS if any(r.state == "running" for r in found) else 0
        return render(request, "runs.html", runs=found, live=live)

    @app.get("/runs/{key}")
    def run(request: Request, key: str) -> Response:
        detail = source.run(key)
        if detail is None:
            return render(request, "message.html", 404, heading="Not found", text="no such run")
        live = LIVE_SECONDS if detail.run.state == "running" else 0
        return render(request, "run.html", d=detail, live=live)

    @app.get("/runs/{key}/plots/{name}.png")
    def plot(key: str, name: str) -> Response:
        folder = source.run_folder(key)
        if folder is None or name not in ("five_way", "loss_per_round"):
            return Response("not found", 404)
        path = folder.plot_path(name)
        return FileResponse(path) if path.is_file() else Response("not found", 404)

    @app.get("/runs/{key}/files/{relative:path}")
    def run_file(key: str, relative: str) -> Response:
        folder = source.run_folder(key)
        allowed = {link.relative for link in file_links(folder)} if folder else set()
        if folder is None or relative not in allowed:
            return Response("not found", 404)
        path = folder.path / relative
        return FileResponse(path, filename=Path(relative).name)

    @app.get("/artifacts")
    def artifacts(request: Request) -> Response:
        rows, pager = paged(source.artifacts(), request)
        return render(request, "artifacts.html", artifacts=rows, pager=pager)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        kind = STATIC_TYPES.get(Path(name).suffix)
        files = resources.files("coordinator.dashboard") / "static"
        if kind is None or "/" in name or not (files / name).is_file():
            return Response("not found", 404)
        response = Response((files / name).read_bytes(), media_type=kind)
        response.headers["Cache-Control"] = "max-age=3600"  # pages refresh; these do not change
        return response

    return app
