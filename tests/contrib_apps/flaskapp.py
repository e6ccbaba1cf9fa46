"""The Flask test app: GreenLeader(app) configured from app.config (APP_STORE, APP_KEY, APP_TTL,
APP_NODE; not greenleader's own GREENLEADER_* variables, which the test blanks), a duty, a
@leader_only view."""

import os

from flask import Flask, jsonify

from greenleader.contrib.flask import GreenLeader, current, leader_only
from tests.contrib_apps.duty_log import run_duty

app = Flask(__name__)
app.config.update(GREENLEADER_STORE=os.environ.get("APP_STORE"), GREENLEADER_KEY=os.environ.get("APP_KEY"),
                  GREENLEADER_TTL=os.environ.get("APP_TTL", "15"), GREENLEADER_NODE=os.environ.get("APP_NODE"))
leader = GreenLeader(app)


@leader.duty
def tick(term: int) -> None:
    run_duty(current(), term)


@app.route("/")
def index():
    election = current()
    return jsonify(pid=os.getpid(), node=election.node if election else None)


@app.route("/leader-only")
@leader_only
def leader_view():
    election = current()
    return jsonify(node=election.node, term=election.term)
