"""The local web server of a rating study (stdlib http.server; 127.0.0.1 by default).

  GET  /                      a form asking for the rater's name
  GET  /rater/NAME            the rater's current latent: its dashboard in a sandboxed frame, an explanation box,
                              Yes / Maybe / No and the rater's progress; a page saying so when all are labelled
  POST /rater/NAME/label      item, label, explanation: as a form (answered with a redirect to the next latent) or
                              as JSON (answered with JSON)
  GET  /item/TOKEN?rater=NAME the dashboard page of an item shown to that rater

Nothing on these pages names the SAE or the latent: an item is an opaque random token. The dashboards are served with
a Content-Security-Policy that runs no script and loads nothing, so corpus text cannot act even if it escaped its
escaping. Every label is committed to the study file before the answer goes out (db.Study.submit). A request that is
malformed, oversized, repeated, or for an item the rater is not being shown gets a 4xx and changes nothing.
"""

from __future__ import annotations

import html
import json
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from saeforge.study.db import MAX_EXPLANATION, Current, Refused, Study, check_rater_name

MAX_BODY = 64 * 1024  # bytes: an explanation of MAX_EXPLANATION characters, form-encoded, fits easily
FIELDS = {"item", "label", "explanation"}
# The rater's own pages: no script at all, frames and forms only to this server.
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; frame-src 'self'; form-action 'self'; "
               "base-uri 'none'; frame-ancestors 'none'")
# A dashboard: styles and inline images only, in a sandbox (no script, no forms, an origin of its own).
ITEM_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; sandbox; " \
              "frame-ancestors 'self'"
RATER_PATH = re.compile(r"/rater/([^/]+)")
LABEL_PATH = re.compile(r"/rater/([^/]+)/label")
ITEM_PATH = re.compile(r"/item/([0-9a-f]+)")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 1em; color: #222; }
header { display: flex; align-items: baseline; gap: 1em; }
iframe { width: 100%; height: 62vh; border: 1px solid #bbb; border-radius: 4px; }
textarea { width: 100%; min-height: 4em; font: inherit; }
button { font-size: 1.1em; padding: .4em 1.6em; margin-right: .6em; }
.help { color: #555; font-size: .9em; }
.error { color: #a00; }
"""


def _document(title: str, body: str) -> bytes:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n").encode()


def index_page() -> bytes:
    return _document("Rating study", """
<h1>Rating study</h1>
<form method="get" action="/rater"><label for="name">Your rater name</label>
<input id="name" name="name" required pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}"> <button type="submit">Start</button>
</form>
<p class="help">Use the name the study's organiser registered for you. You can stop at any time and come back to
your page later: every answer is saved as soon as you give it.</p>""")


def rating_page(rater: str, current: Current) -> bytes:
    name = html.escape(rater)
    if current.token is None:
        return _document("Rating study: done", f"<h1>Thank you, {name}</h1><p id=\"progress\">All "
                                               f"{current.total} latents labelled.</p>")
    token = html.escape(current.token)
    number = current.position + 1
    return _document(f"Rating study: latent {number} of {current.total}", f"""
<header><h1>Latent {number} of {current.total}</h1>
<progress value="{current.labelled}" max="{current.total}"></progress>
<span id="progress">{current.labelled} of {current.total} labelled</span></header>
<iframe id="dashboard" title="feature dashboard" sandbox src="/item/{token}?rater={name}"></iframe>
<form method="post" action="/rater/{name}/label">
<input type="hidden" name="item" value="{token}">
<p><label for="explanation">What does this latent respond to? (needed for Yes and Maybe)</label><br>
<textarea id="explanation" name="explanation" maxlength="{MAX_EXPLANATION}"></textarea></p>
<p>Is it interpretable?
<button type="submit" name="label" value="yes">Yes</button>
<button type="submit" name="label" value="maybe">Maybe</button>
<button type="submit" name="label" value="no">No</button></p>
</form>
<p class="help">Yes: one explanation fits its top activations and the other examples. Maybe: an explanation fits
some of them, or only loosely. No: no pattern you can name. Each answer is saved when you give it; you can stop and
come back to this page later.</p>""")


def error_page(status: int, message: str, rater: str | None) -> bytes:
    back = f'<p><a href="/rater/{html.escape(rater)}">Back to your current latent</a></p>' if rater else ""
    return _document(f"{status} {HTTPStatus(status).phrase}",
                     f'<h1>{status} {HTTPStatus(status).phrase}</h1><p class="error">{html.escape(message)}</p>{back}')


class StudyHandler(BaseHTTPRequestHandler):
    server: "StudyServer"
    server_version = "saeforge-rate"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, content_type: str, policy: str = PAGE_POLICY,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _html(self, body: bytes, status: int = 200) -> None:
        self._send(status, body, "text/html; charset=utf-8")

    def _json(self, payload: dict, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _redirect(self, location: str) -> None:
        self._send(303, b"", "text/plain", headers={"Location": location})

    def _refuse(self, error: Refused, rater: str | None = None, as_json: bool = False) -> None:
        if as_json:
            self._json({"error": str(error)}, error.status)
        else:
            self._html(error_page(error.status, str(error), rater), error.status)

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            if url.path == "/":
                return self._html(index_page())
            if url.path == "/rater":
                return self._redirect(f"/rater/{check_rater_name(query.get('name', [''])[0])}")
            if m := RATER_PATH.fullmatch(url.path):
                rater = check_rater_name(m[1])
                with Study(self.server.study_path) as study:
                    return self._html(rating_page(rater, study.show_current(rater)))
            if m := ITEM_PATH.fullmatch(url.path):
                rater = check_rater_name(query.get("rater", [""])[0])
                with Study(self.server.study_path) as study:
                    page = study.page(rater, m[1])
                return self._send(200, page.encode(), "text/html; charset=utf-8", policy=ITEM_POLICY)
            raise Refused(404, f"no page at {url.path}")
        except Refused as e:
            self._refuse(e)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        m = LABEL_PATH.fullmatch(url.path)
        as_json = self.headers.get_content_type() == "application/json"
        rater = None
        try:
            if not m:
                raise Refused(404, f"nothing to post to at {url.path}")
            rater = check_rater_name(m[1])
            fields = self._fields(as_json)
            with Study(self.server.study_path) as study:
                current = study.submit(rater, fields["item"], fields["label"], fields["explanation"])
        except Refused as e:
            self.close_connection = True  # the body may be unread: the next bytes are not a request
            return self._refuse(e, rater, as_json)
        if as_json:
            return self._json({"labelled": current.labelled, "total": current.total, "next": current.token})
        self._redirect(f"/rater/{rater}")

    def _fields(self, as_json: bool) -> dict[str, str]:
        """The posted item, label and explanation (exactly these, each once, each a string), or Refused."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise Refused(411, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(411, "a label needs a Content-Length header") from None
        if not 0 <= length <= MAX_BODY:
            raise Refused(413, f"the request body is {length} bytes; at most {MAX_BODY}")
        body = self.rfile.read(length)
        try:
            text = body.decode("utf-8")
            if as_json:
                fields = json.loads(text)
                if not isinstance(fields, dict):
                    raise ValueError("the body is not a JSON object")
            elif self.headers.get_content_type() == "application/x-www-form-urlencoded":
                parsed = parse_qs(text, keep_blank_values=True, strict_parsing=True, max_num_fields=len(FIELDS))
                if any(len(v) != 1 for v in parsed.values()):
                    raise ValueError("a field is given more than once")
                fields = {k: v[0] for k, v in parsed.items()}
            else:
                raise Refused(415, "send the label as application/x-www-form-urlencoded or application/json")
        except ValueError as e:  # includes bad UTF-8, JSON and form encoding, and too many fields
            raise Refused(400, f"malformed request body: {e}") from None
        if set(fields) != FIELDS:
            missing, extra = sorted(FIELDS - set(fields)), sorted(set(fields) - FIELDS)
            raise Refused(400, f"a label has exactly the fields {sorted(FIELDS)}"
                               + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        if not all(isinstance(v, str) for v in fields.values()):
            raise Refused(400, "every field must be a string")
        return fields

    def _not_allowed(self) -> None:
        self.close_connection = True  # its body is not read
        self._refuse(Refused(405, f"{self.command} is not supported here"))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class StudyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, study_path: Path, host: str = "127.0.0.1", port: int = 8765):
        self.study_path = Path(study_path)
        Study(self.study_path).close()  # a missing or foreign file fails here, before the server listens
        super().__init__((host, port), StudyHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
