"""A plain Flask app, as a team has it today; mounted unchanged under a prefix."""

from __future__ import annotations

import threading

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.get("/")
def home() -> Response:
    return jsonify(app="legacy", thread=threading.current_thread().name, path=request.path)


@app.post("/upload")
def upload() -> Response:
    return jsonify(received=len(request.get_data()))


@app.get("/boom")
def boom() -> Response:
    raise RuntimeError("legacy code failed")
