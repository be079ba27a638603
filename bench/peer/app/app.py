"""The reference app of bench/peer: the deployment tutorial's Flask notes app.

Flask + Flask-SQLAlchemy on PostgreSQL, served by gunicorn (gunicorn.conf.py). It is the
baseline notesd is measured against, so it stays the plain tutorial code: no caching, no
tuning. Database: $PEER_DATABASE_URL (bench/peer/lib.sh sets it; the default below is the
same), table `notes`.
"""
import os

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import text

DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/notesd_peer"

db = SQLAlchemy()


class Note(db.Model):
    __tablename__ = "notes"

    id = db.Column(db.Integer, primary_key=True)
    title = db.Column(db.String(160), nullable=False)
    body = db.Column(db.Text, nullable=True)
    created_at = db.Column(db.DateTime(timezone=True), server_default=db.func.now(), index=True)

    def to_dict(self):
        return {"id": self.id, "title": self.title, "body": self.body}


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("PEER_DATABASE_URL", DEFAULT_URL)
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    db.init_app(app)

    @app.get("/")
    def index():
        return jsonify(message="Hello, production!")

    @app.get("/healthz")
    def healthz():
        return jsonify(ok=True)

    @app.get("/readyz")
    def readyz():
        db.session.execute(text("SELECT 1"))
        return jsonify(ok=True)

    @app.get("/api/notes")
    def list_notes():
        newest = Note.query.order_by(Note.created_at.desc()).limit(50).all()
        return jsonify([note.to_dict() for note in newest])

    @app.post("/api/notes")
    def create_note():
        data = request.get_json(force=True) or {}
        note = Note(title=data.get("title", "Untitled"), body=data.get("body"))
        db.session.add(note)
        db.session.commit()
        return jsonify(id=note.id), 201

    @app.get("/api/notes/<int:note_id>")
    def get_note(note_id):
        note = db.session.get(Note, note_id)
        if note is None:
            return jsonify(error="not found"), 404
        return jsonify(note.to_dict())

    return app


app = create_app()
