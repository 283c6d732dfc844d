"""The study's web application (Flask): reader pages, image serving and the organiser's pages.

Routes (a token is the whole credential, so every route starts from one):

    GET  /r/<token>                    the reader's current image and question, or "done"
    GET  /r/<token>/image/<image_id>   a PNG of the reader's own queue, nothing else
    POST /r/<token>/answer             one answer: stored in one transaction, then the next image
    GET  /o/<token>                    organiser: progress and each reader's private link
    GET  /o/<token>/export.csv         organiser: every answer with its truth (README "Reader studies")

A reader's pages never carry the truth, the source manifest, file names or other
readers' answers. Unknown tokens and images outside the queue get the same 404;
a malformed answer gets 400, a replayed or stale one 409. Pages send a strict
Content-Security-Policy (scripts and images from this server only), no referrer
(the token is in the URL) and no caching.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from flask import Flask, Response, abort, g, redirect, render_template, request, send_from_directory, url_for

from busgen_lib.reader_study.questions import (
    BIRADS_BUTTONS,
    CONFIDENCE_CHOICES,
    SOURCE_CHOICES,
    check_answer,
)
from busgen_lib.reader_study.store import IMAGE_FOLDER, Study

TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
IMAGE_ID = re.compile(r"[0-9a-f]{16}")
MAX_FORM_BYTES = 4096  # an answer is a few short fields
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def create_app(study_dir: str | Path) -> Flask:
    """The Flask application of one study folder (checked on creation: DataError if it is not a study)."""
    folder = Path(study_dir).resolve()
    Study(folder).close()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_FORM_BYTES, STUDY=folder)

    def study() -> Study:
        if "study" not in g:
            g.study = Study(folder)
        return g.study

    @app.teardown_appcontext
    def _close(_exc) -> None:
        if "study" in g:
            g.pop("study").close()

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.update(HEADERS)
        return response

    def reader_or_404(token: str) -> str:
        reader = study().reader_for(token) if TOKEN.fullmatch(token) else None
        if reader is None:
            abort(404)
        return reader

    def organiser_or_404(token: str) -> None:
        if not (TOKEN.fullmatch(token) and study().is_organiser(token)):
            abort(404)

    @app.get("/r/<token>")
    def reader_page(token: str):
        reader = reader_or_404(token)
        item = study().current(reader)
        if item is None:
            return render_template("done.html", title=study().settings["title"])
        study().mark_shown(reader, item.position)
        return render_template("reader.html", token=token, item=item, question=study().question,
                               title=study().settings["title"], sources=SOURCE_CHOICES,
                               confidences=CONFIDENCE_CHOICES, birads=BIRADS_BUTTONS)

    @app.get("/r/<token>/image/<image_id>")
    def image(token: str, image_id: str):
        reader = reader_or_404(token)
        if not (IMAGE_ID.fullmatch(image_id) and study().in_queue(reader, image_id)):
            abort(404)
        return send_from_directory(folder / IMAGE_FOLDER, f"{image_id}.png", mimetype="image/png")

    @app.post("/r/<token>/answer")
    def answer(token: str):
        reader = reader_or_404(token)
        if any(len(values) != 1 for values in request.form.listvalues()):
            abort(400)  # a field given twice is not an answer
        form = request.form.to_dict(flat=True)
        position, image_id, stage = form.get("position", ""), form.get("image_id", ""), form.get("stage", "")
        second = stage == "second"
        fields = check_answer(study().question, form, second)
        if (fields is None or not position.isdigit() or len(position) > 6 or not IMAGE_ID.fullmatch(image_id)
                or stage not in ("first", "second") or (second and not study().asks_second)):
            abort(400)
        if not study().record(reader, int(position), image_id, fields, second):
            return render_template("message.html", title="Already answered", token=token,
                                   message="This answer was not saved: the image was already answered or is not "
                                           "the current one. Continue with the current image."), 409
        return redirect(url_for("reader_page", token=token), code=303)

    @app.get("/o/<token>")
    def organiser(token: str):
        organiser_or_404(token)
        base = request.host_url.rstrip("/")
        return render_template("organiser.html", token=token, title=study().settings["title"],
                               question=study().question, progress=study().progress(), base=base)

    @app.get("/o/<token>/export.csv")
    def export(token: str):
        organiser_or_404(token)
        buffer = io.StringIO()
        study().write_export(buffer)
        return Response(buffer.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=reader_study_export.csv"})

    @app.errorhandler(400)
    def _bad(_err):
        return render_template("message.html", title="Not an answer", token=None,
                               message="The answer was incomplete or malformed and was not saved."), 400

    @app.errorhandler(404)
    def _missing(_err):
        return render_template("message.html", title="Not found", token=None,
                               message="This link is not valid. Check the link the organiser sent you."), 404

    return app
