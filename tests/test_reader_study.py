"""The reader-study platform through Flask's test client: blinding, queues, answers, security, export, CLI."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from PIL import Image
from werkzeug.datastructures import MultiDict

from busgen_lib.cli import main
from busgen_lib.data.manifest import read_manifest, resolve
from busgen_lib.data.pixels import unit_grayscale
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.turing import EXPORT_COLUMNS, read_turing_export, turing_table
from busgen_lib.reader_study.app import create_app
from busgen_lib.reader_study.create import create_study, reader_path
from busgen_lib.reader_study.store import DB_NAME, IMAGE_FOLDER, Study

from reader_study_fixtures import N_PER_SOURCE, export_frame, form_of, phantom_pair, turing_study, with_model_output


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return phantom_pair(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture
def study(tmp_path, pair):
    return turing_study(tmp_path, pair)


@pytest.fixture
def client(study):
    app = create_app(study.folder)
    app.testing = True
    return app.test_client()


def _answer(client, token, html=None, **fields):
    page = html if html is not None else client.get(reader_path(token)).get_data(as_text=True)
    return client.post(f"{reader_path(token)}/answer", data={**form_of(page), **fields})


# ------------------------------------------------------------------ creation and blinding

def test_a_study_is_balanced_and_every_reader_gets_the_same_images_in_an_own_order(study):
    db = sqlite3.connect(study.folder / DB_NAME)
    sources = dict(db.execute("SELECT source, COUNT(*) FROM images GROUP BY source").fetchall())
    assert sources == {"real": N_PER_SOURCE, "generated": N_PER_SOURCE}
    queues = {r: [i for (i,) in db.execute("SELECT image_id FROM queue WHERE reader = ? ORDER BY position", (r,))]
              for r in ("alice", "bob")}
    images = sorted(i for (i,) in db.execute("SELECT image_id FROM images"))
    assert sorted(queues["alice"]) == sorted(queues["bob"]) == images
    assert queues["alice"] != queues["bob"]


def test_images_are_blinded_copies_under_random_ids_with_the_source_pixels(study):
    db = sqlite3.connect(study.folder / DB_NAME)
    for image_id, original in db.execute("SELECT image_id, original FROM images"):
        assert len(image_id) == 16 and int(image_id, 16) >= 0
        copy = Image.open(study.folder / IMAGE_FOLDER / f"{image_id}.png")
        assert copy.mode == "L" and not copy.info  # no text chunks, no metadata of the source
        expected = np.round(unit_grayscale(Image.open(original)) * 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(copy), expected)
    assert sorted(p.name for p in (study.folder / IMAGE_FOLDER).iterdir()) == sorted(
        f"{i}.png" for (i,) in db.execute("SELECT image_id FROM images"))


def test_tokens_are_long_random_and_distinct(study):
    tokens = [study.organiser_token, *study.reader_tokens.values()]
    assert len(set(tokens)) == 3 and all(len(t) == 43 for t in tokens)


def test_creation_refuses_what_cannot_make_a_fair_study(tmp_path, pair):
    real, generated = pair
    with pytest.raises(UsageError, match="needs real and generated"):
        create_study(tmp_path / "a", ["r1"], real=[real])
    with pytest.raises(UsageError, match="only 6 image"):
        create_study(tmp_path / "b", ["r1"], real=[real], generated=[generated], n_per_source=7)
    with pytest.raises(UsageError, match="at least 1"):
        create_study(tmp_path / "b", ["r1"], real=[real], generated=[generated], n_per_source=0)
    with pytest.raises(UsageError, match="reader name"):
        create_study(tmp_path / "c", ["../x"], real=[real], generated=[generated])
    with pytest.raises(UsageError, match="unique"):
        create_study(tmp_path / "d", ["r1", "r1"], real=[real], generated=[generated])
    with pytest.raises(UsageError, match="for the birads question"):
        create_study(tmp_path / "e", ["r1"], real=[real], generated=[generated], model_column="x")


def test_images_of_different_sizes_are_refused_unless_resampled(tmp_path, pair):
    from busgen_lib.data.phantom import write_phantom

    big = write_phantom(tmp_path / "big", n=4, size=40, seed=3, progress=False)
    with pytest.raises(UsageError, match="give the answer away"):
        create_study(tmp_path / "s", ["r1"], real=[pair[0]], generated=[big])
    made = create_study(tmp_path / "s", ["r1"], real=[pair[0]], generated=[big], size=32)
    assert {Image.open(p).size for p in (made.folder / IMAGE_FOLDER).iterdir()} == {(32, 32)}


# ------------------------------------------------------------------ what a reader sees

def test_the_reader_page_shows_no_truth_source_or_other_reader(client, study, pair):
    html = client.get(reader_path(study.reader_tokens["alice"])).get_data(as_text=True)
    assert "Image 1 of 6" in html
    manifest = read_manifest(pair[0])
    originals = [resolve(manifest, "image", i).name for i in range(len(manifest))]
    forbidden = [study.organiser_token, study.reader_tokens["bob"], "benign", "malignant", "normal", "manifest",
                 *originals]
    assert [word for word in forbidden if word in html] == []
    db = sqlite3.connect(study.folder / DB_NAME)
    first = db.execute("SELECT image_id FROM queue WHERE reader = 'alice' AND position = 0").fetchone()[0]
    assert form_of(html) == {"position": "0", "image_id": first, "stage": "first"}


def test_a_reader_answers_one_image_after_another_and_resumes_where_they_stopped(client, study):
    token = study.reader_tokens["alice"]
    for k in range(3):
        assert _answer(client, token, answer="generated", confidence=str(k + 1)).status_code == 303
    html = client.get(reader_path(token)).get_data(as_text=True)  # a fresh visit: the same link resumes
    assert "Image 4 of 6 (3 answered)" in html and form_of(html)["position"] == "3"
    for _ in range(3):
        _answer(client, token, answer="real", confidence="5")
    assert "All images are answered" in client.get(reader_path(token)).get_data(as_text=True)


def test_pages_send_headers_that_keep_the_token_and_page_private(client, study):
    response = client.get(reader_path(study.reader_tokens["alice"]))
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


# ------------------------------------------------------------------ refused requests

def test_unknown_or_malformed_tokens_get_404(client, study):
    good = study.reader_tokens["alice"]
    for token in ("x" * 43, good[:-1], good + "a", "", "%00", study.organiser_token):
        assert client.get(f"/r/{token}").status_code == 404
    assert client.get(f"/o/{good}").status_code == 404  # a reader's token opens no organiser page
    assert client.get(f"/o/{good}/export.csv").status_code == 404
    assert client.get(f"/o/{study.organiser_token}").status_code == 200


def test_image_serving_cannot_leave_the_readers_queue_or_the_study_folder(client, study):
    token = study.reader_tokens["alice"]
    image_id = form_of(client.get(reader_path(token)).get_data(as_text=True))["image_id"]
    ok = client.get(f"/r/{token}/image/{image_id}")
    assert ok.status_code == 200 and ok.mimetype == "image/png"
    assert ok.data == (study.folder / IMAGE_FOLDER / f"{image_id}.png").read_bytes()
    for attempt in (f"../{DB_NAME}", f"..%2F{DB_NAME}", f"..%2f..%2f{DB_NAME}", f"{image_id}.png",
                    image_id.upper(), "0" * 16, f"%2e%2e/%2e%2e/{IMAGE_FOLDER}/{image_id}"):
        assert client.get(f"/r/{token}/image/{attempt}").status_code == 404, attempt
    assert client.get(f"/r/{token}/../../{DB_NAME}").status_code == 404
    assert client.get(f"/static/../{DB_NAME}").status_code == 404


def test_malformed_answers_are_refused_and_store_nothing(client, study):
    token = study.reader_tokens["alice"]
    html = client.get(reader_path(token)).get_data(as_text=True)
    hidden = form_of(html)
    bad = [{"answer": "maybe", "confidence": "3"}, {"answer": "real", "confidence": "6"}, {"answer": "real"},
           {"answer": "real", "confidence": "3", "truth_source": "real"}, {"answer": "real", "confidence": "3",
           "birads": "4a"}, {**hidden, "position": "-1", "answer": "real", "confidence": "3"},
           {**hidden, "position": "x", "answer": "real", "confidence": "3"},
           {**hidden, "image_id": "../x", "answer": "real", "confidence": "3"},
           {**hidden, "stage": "second", "answer": "real", "confidence": "3"}]
    for fields in bad:
        assert client.post(f"{reader_path(token)}/answer", data={**hidden, **fields}).status_code == 400, fields
    twice = client.post(f"{reader_path(token)}/answer",
                        data=MultiDict([*hidden.items(), ("answer", "real"), ("answer", "generated"),
                                        ("confidence", "2")]))
    assert twice.status_code == 400
    assert client.post(f"{reader_path(token)}/answer", data={**hidden, "answer": "real", "confidence": "3",
                                                              "pad": "x" * 5000}).status_code == 413
    assert Study(study.folder).export_rows() == []


def test_replayed_and_out_of_order_answers_are_refused(client, study):
    token = study.reader_tokens["alice"]
    html = client.get(reader_path(token)).get_data(as_text=True)
    assert _answer(client, token, html, answer="real", confidence="2").status_code == 303
    replay = _answer(client, token, html, answer="generated", confidence="5")  # the same form again
    assert replay.status_code == 409
    ahead = {**form_of(client.get(reader_path(token)).get_data(as_text=True)), "answer": "real", "confidence": "1"}
    ahead["position"] = "4"
    assert client.post(f"{reader_path(token)}/answer", data=ahead).status_code == 409
    rows = Study(study.folder).export_rows()
    assert [(r["reader"], r["position"], r["answer"], r["confidence"]) for r in rows] == [("alice", "0", "real", "2")]


def test_an_answer_counts_for_the_tokens_reader_only(client, study):
    bob = study.reader_tokens["bob"]
    assert _answer(client, bob, answer="real", confidence="1", reader="alice").status_code == 400
    assert _answer(client, bob, answer="real", confidence="1").status_code == 303
    assert [row["reader"] for row in Study(study.folder).export_rows()] == ["bob"]
    assert "Image 1 of 6 (0 answered)" in client.get(reader_path(study.reader_tokens["alice"])).get_data(as_text=True)


# ------------------------------------------------------------------ the organiser

def test_the_export_holds_every_answer_once_with_its_truth(client, study):
    db = sqlite3.connect(study.folder / DB_NAME)
    truth = dict(db.execute("SELECT image_id, source FROM images"))
    given = {}
    for reader, token in study.reader_tokens.items():
        for k in range(4 if reader == "alice" else 2):
            html = client.get(reader_path(token)).get_data(as_text=True)
            guess = "generated" if k % 2 else "real"
            given[(reader, form_of(html)["image_id"])] = guess
            _answer(client, token, html, answer=guess, confidence="3")
    response = client.get(f"/o/{study.organiser_token}/export.csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    df = export_frame(response.get_data(as_text=True))
    assert tuple(df.columns) == EXPORT_COLUMNS
    assert dict(zip(zip(df["reader"], df["image_id"]), df["answer"])) == given and len(df) == 6
    assert all(df["truth_source"] == [truth[i] for i in df["image_id"]])
    assert (df["answered_at"] >= df["shown_at"]).all() and (df["shown_at"] != "").all()
    organiser = client.get(f"/o/{study.organiser_token}").get_data(as_text=True)
    assert "4 / 6" in organiser and "2 / 6" in organiser and study.reader_tokens["bob"] in organiser


def test_a_birads_study_asks_again_after_showing_the_models_output(tmp_path, pair):
    real = with_model_output(pair[0], tmp_path / "scored" / "manifest.csv")
    made = create_study(tmp_path / "study", ["r1"], real=[real], question="birads", model_column="model_birads")
    app = create_app(made.folder)
    client, token = app.test_client(), made.reader_tokens["r1"]
    db = sqlite3.connect(made.folder / DB_NAME)
    first = client.get(reader_path(token)).get_data(as_text=True)
    assert "Model output" not in first and form_of(first)["stage"] == "first"
    assert _answer(client, token, first, answer="real", confidence="1").status_code == 400  # not this question
    assert _answer(client, token, first, birads="4a").status_code == 303
    second = client.get(reader_path(token)).get_data(as_text=True)
    image_id = form_of(second)["image_id"]
    shown = db.execute("SELECT model_output FROM images WHERE image_id = ?", (image_id,)).fetchone()[0]
    assert form_of(second) == {**form_of(first), "stage": "second"} and f'id="model-output">{shown}<' in second
    assert _answer(client, token, first, birads="5").status_code == 409  # the first answer cannot be changed
    assert _answer(client, token, second, second_birads="9").status_code == 400
    assert _answer(client, token, second, second_birads="4b").status_code == 303
    row = Study(made.folder).export_rows()[0]
    assert (row["birads"], row["model_output"], row["second_birads"]) == ("4a", shown, "4b")
    assert row["answer"] == "" and row["second_answered_at"] >= row["answered_at"]
    assert Study(made.folder).progress()[0].done == 1


# ------------------------------------------------------------------ the command line

def test_cli_creates_and_exports_a_study_the_turing_analysis_reads(tmp_path, pair, capsys):
    real, generated = pair
    out = tmp_path / "study"
    assert main(["reader-study", "create", "--out", str(out), "--real", str(real), "--generated", str(generated),
                 "--reader", "r1", "--n-per-source", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    token = Study(out).settings["organiser_token"]
    assert f"/o/{token}" in printed and "reader r1: /r/" in printed
    client = create_app(out).test_client()
    reader_token = printed.split("reader r1: /r/")[1].split()[0]
    for _ in range(4):
        _answer(client, reader_token, answer="real", confidence="4")
    assert main(["reader-study", "export", "--study", str(out), "--out", str(tmp_path / "answers.csv")]) == 0
    table = turing_table(read_turing_export(tmp_path / "answers.csv"))
    assert table.loc[0, ["reader", "n", "correct", "specificity", "sensitivity"]].tolist() == ["r1", 4, 2, 1.0, 0.0]


@pytest.mark.parametrize("argv, status, message", [
    (["create", "--out", "{tmp}/s", "--reader", "r1", "--real", "{real}"], 2, "needs real and generated"),
    (["create", "--out", "{tmp}/s", "--reader", "r1", "--real", "{tmp}/none.csv", "--generated", "{real}"], 1,
     "none.csv"),
    (["serve", "--study", "{tmp}"], 1, "not a reader study"),
    (["serve", "--study", "{tmp}", "--host", "localhost"], 2, "give an IP address"),
    (["export", "--study", "{tmp}", "--out", "{tmp}"], 2, "is a folder"),
])
def test_cli_answers_bad_input_in_one_line(tmp_path, pair, capsys, argv, status, message):
    argv = [a.format(tmp=tmp_path, real=pair[0]) for a in argv]
    assert main(["reader-study", *argv]) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("busgen: error:") and message in err and "\n" not in err
