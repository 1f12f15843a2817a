"""The Python client's token= against a daemon with an auth policy."""
import hashlib
import json
import os

import pytest

import modelstate
from conftest import Daemon

WRITER = "py-writer-token-5d1c"
READER = "py-reader-token-8e2f"


def _sha256(token):
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    policy = tmp_path_factory.mktemp("auth") / "policy.json"
    policy.write_text(json.dumps({"principals": [
        {"name": "trainer", "token_sha256": [_sha256(WRITER)],
         "roles": [{"models": "*", "role": "admin"}]},
        {"name": "worker", "token_sha256": [_sha256(READER)],
         "roles": [{"models": "shared-*", "role": "read"}]},
    ]}))
    d = Daemon(["--auth_policy=%s" % policy])
    trainer = modelstate.connect(d.address, timeout=60, token=WRITER)
    trainer.create("shared-net", arch={"type": "Linear", "args": [3, 2]})
    trainer.create("private-net", arch={"type": "Linear", "args": [3, 2]})
    yield d
    d.stop()


def test_token_authenticates_and_roles_apply(guarded):
    worker = modelstate.connect(guarded.address, timeout=60, token=READER)
    assert [m.name for m in worker.models()] == ["shared-net"]
    state = worker.state_dict("shared-net")
    assert sorted(state) == ["bias", "weight"]
    with pytest.raises(modelstate.PermissionDenied, match="needs role write"):
        worker.load_state_dict("shared-net", state)
    with pytest.raises(modelstate.PermissionDenied, match="has no role"):
        worker.state_dict("private-net")

    with pytest.raises(modelstate.Unauthenticated, match="no credentials"):
        modelstate.connect(guarded.address, timeout=60).models()
    with pytest.raises(modelstate.Unauthenticated, match="unknown bearer token"):
        modelstate.connect(guarded.address, timeout=60, token="nope").models()


def test_token_defaults_to_the_environment(guarded, monkeypatch):
    monkeypatch.setenv("MODELSTATE_TOKEN", READER + "\n")
    assert "shared-net" in [m.name for m in
                            modelstate.connect(guarded.address, timeout=60).models()]
    # An explicit token wins over the environment.
    with pytest.raises(modelstate.Unauthenticated):
        modelstate.connect(guarded.address, timeout=60, token="nope").models()


def test_token_never_reaches_the_log(guarded):
    for token in (WRITER, READER):
        assert token not in "".join(guarded.log)
    assert any("audit: " in line and "principal=trainer action=CreateModel" in line
               for line in guarded.log)
