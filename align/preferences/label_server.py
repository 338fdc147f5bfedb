"""The web side of `align label`: a Flask app serving the ranking page and its two JSON calls, and the server
that runs it until the round is complete or the user stops it.

What the server lets through:
- Only its own page (`/`), two fixed static files and `/api/next`, `/api/submit`: no route takes a path, so
  nothing outside the round can be read, and the only file written is the round's journal.
- On loopback, only requests addressed to this server's own host name and port (a page on another site that
  rebinds its DNS name to 127.0.0.1 is refused).
- Served beyond loopback, only requests carrying the access token: once in the printed address, then as a
  same-site cookie; anything else gets 403.
- State-changing requests must be JSON POSTs carrying the page's anti-forgery token in a header and, when the
  browser says where they come from, come from this server's origin; a page on another site can do neither.
- Responses are rendered by the page as text (`textContent`), and the Content-Security-Policy allows only the
  server's own scripts, so a response holding `<script>` or an `onerror=` attribute stays inert.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask, jsonify, make_response, redirect, request, send_from_directory
from werkzeug.serving import make_server

from align.preferences.labeling import Conflict, LabelError, LabelingRound

PAGE = Path(__file__).with_name("label_page")
STATIC = {"label.js": "text/javascript", "label.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(labeling: LabelingRound, port: int, token: str | None, loopback: bool,
               on_complete: Callable[[], None] = lambda: None) -> Flask:
    """The app for one round. `token` (None on loopback) is required on every request; on loopback the Host
    header must name this server."""
    app = Flask(__name__, static_folder=None)
    csrf = secrets.token_urlsafe(32)
    page = (PAGE / "index.html").read_text(encoding="utf-8").replace("{{csrf}}", csrf)
    cookie = f"align_label_{port}"
    own_hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}

    def refuse(why: str):
        response = make_response(f"403 Forbidden: {why}\n", 403)
        response.mimetype = "text/plain"
        return response

    @app.before_request
    def guard():
        if loopback and request.host not in own_hosts:
            return refuse("this server answers only to its own address")
        if token is not None:
            given = request.args.get("token")
            if given is not None:
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return refuse("wrong access token")
                response = redirect(request.path, 303)  # the token leaves the address bar and the history
                response.set_cookie(cookie, token, httponly=True, samesite="Strict")
                return response
            if not hmac.compare_digest(request.cookies.get(cookie, "").encode(), token.encode()):
                return refuse("open the address `align label` printed, with its access token")
        if request.method != "GET":
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return refuse("cross-site request")
            if not request.is_json or not hmac.compare_digest(request.headers.get("X-CSRF-Token", "").encode(),
                                                              csrf.encode()):
                return refuse("missing anti-forgery token — reload the page")
        return None

    @app.after_request
    def headers(response):
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/")
    def index():
        response = make_response(page)
        response.mimetype = "text/html"
        return response

    @app.get("/static/<name>")
    def static_file(name: str):
        if name not in STATIC:
            return make_response("404 Not Found\n", 404)
        return send_from_directory(PAGE, name, mimetype=STATIC[name], max_age=0)

    def answer(call: Callable[[dict], dict]):
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="the request body must be a JSON object"), 400
        try:
            result = call(body)
        except Conflict as exc:  # already judged (a second tab): move on to the next item
            return jsonify(error=str(exc), **labeling.next_for(body.get("labeler"))), 409
        except LabelError as exc:
            return jsonify(error=str(exc)), 400
        if result["finished"]:
            on_complete()
        return jsonify(result)

    @app.post("/api/next")
    def next_item():
        return answer(lambda body: labeling.next_for(body.get("labeler")))

    @app.post("/api/submit")
    def submit():
        return answer(lambda body: labeling.submit(body.get("labeler"), body.get("item"), body.get("action"),
                                                   body.get("ranks"), body.get("reason"), body.get("note")))

    return app


class LabelServer:
    """A server bound to host:port (0 = any free port) at once, so that a busy port fails before any work;
    `serve(round)` then serves that round until it is complete (returns) or KeyboardInterrupt (raised)."""

    def __init__(self, host: str, port: int, require_token: bool):
        self.host = host
        self.token = secrets.token_urlsafe(24) if require_token else None
        self._complete = threading.Event()
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # werkzeug exits the process on a busy port; find out first, as an OSError the stage can explain
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        self._server = make_server(host, port, app=None, threaded=True)
        self.port = self._server.server_port
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per request

    @property
    def address(self) -> str:
        shown = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def serve(self, labeling: LabelingRound) -> None:
        self._server.app = create_app(labeling, self.port, self.token, is_loopback(self.host), self._complete.set)
        threading.Thread(target=self._stop_when_complete, daemon=True).start()
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def close(self) -> None:
        self._server.server_close()

    def _stop_when_complete(self) -> None:
        self._complete.wait()
        time.sleep(0.5)  # let the last submission's answer reach the page
        self._server.shutdown()
