"""Who may talk to the dashboard: the Host header, the access token, CSRF on every change.

- Bound to a loopback name (127.0.0.1, localhost, ::1) no token is needed, as for any local CLI;
  bound to any other address a token is required on every request, the event streams included
  (header `Authorization: Bearer`, the `token` query parameter of the printed URL, or the cookie
  that URL sets: an EventSource cannot send headers).
- The Host header must name the address served: a web page elsewhere cannot reach us through a
  DNS name rebound to 127.0.0.1.
- State changes are POST only, with the page's CSRF token in `X-CSRF-Token` and, when the browser
  sends one, an Origin equal to ours: another site can neither read the token nor set the header.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "llamafarm_ui_token"
CSRF_HEADER = "x-csrf-token"
TOKEN_ENV = "LLAMAFARM_UI_TOKEN"


def needs_token(host: str) -> bool:
    return host not in LOOPBACK_NAMES


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Guard:
    host: str
    port: int
    token: str | None  # None: loopback, no token asked
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def allowed_hosts(self) -> set[str]:
        names = {self.host} | (set(LOOPBACK_NAMES) if not needs_token(self.host) else set())
        return {_host_header(name, self.port) for name in names}

    def refuse(self, request: Request) -> Response | None:
        """None when the request may go on; else the response that refuses it, with the reason."""
        if request.headers.get("host") not in self.allowed_hosts():
            return _refusal(400, f"unexpected Host header {request.headers.get('host')!r}; "
                                 f"open {self.url()} instead")
        if self.token is not None and not self._token_ok(request):
            return _refusal(401, "missing or wrong access token: open the URL `llamafarm ui` printed "
                                 f"(it ends in ?token=...), or send `Authorization: Bearer <token>` (${TOKEN_ENV})")
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin is not None and origin != f"http://{request.headers['host']}":
                return _refusal(403, f"cross-site request from {origin} refused")
            if not secrets.compare_digest(request.headers.get(CSRF_HEADER, ""), self.csrf):
                return _refusal(403, "missing or wrong CSRF token: reload the dashboard page and try again")
        return None

    def _token_ok(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        offered = [auth[7:] if auth.startswith("Bearer ") else "", request.cookies.get(TOKEN_COOKIE, ""),
                   request.query_params.get("token", "")]
        return any(o and secrets.compare_digest(o, self.token) for o in offered)

    def url(self) -> str:
        base = f"http://{_host_header(self.host, self.port)}/"
        return base + (f"?token={self.token}" if self.token else "")

    def remember(self, request: Request, response: Response) -> None:
        """The printed URL's token becomes a same-site cookie, so the page's own requests carry it."""
        if self.token and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")


def _refusal(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
