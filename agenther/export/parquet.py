"""A Parquet dataset with its card: `hf/` is a folder `datasets.load_dataset("path/to/hf", NAME)` reads.

- `hf/data/hindsight-<sha>.parquet` and `hf/data/success-<sha>.parquet`: the SFT samples, config
  `sft`, splits `hindsight` and `success` (hindsight samples and original successes kept apart);
- `hf/data/preference-<sha>.parquet`: the preference pairs, config `preference`, split `train`;
- `hf/README.md`: the dataset card, whose YAML header (`configs`) names those files
  (written by the package stage with the card, see `configs`).

Every column has one fixed type (messages as OpenAI-format structs with JSON-text tool-call
`arguments`; `tools` and `metadata` as JSON text), so every row has the same columns whatever mix
of sources went in. A split with no rows is not written, and the card does not name it.

Weights: `sample_weight` is the sample's; every assistant message of the `sft` config has its 0/1
`weight` (1 = train, 0 = context only; the annotated rows give none on an original success's turns,
which all train: 1 here), other messages null. Preference rows keep the annotated messages' weights.

File names carry the first 12 hex digits of their sha256: `datasets` caches a local folder by its
config and file names, not their contents (seen with datasets 5.2: a rerun into the same folder, or a
second run's folder of the same name, was served the first one's rows). New content, new name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from agenther.export.exporter import Exporter, Lines
from agenther.export.formats import trains
from agenther.workdir import write_text_atomic

FOLDER = "hf"
CARD = f"{FOLDER}/README.md"
SFT_FILES = {"hindsight": f"{FOLDER}/data/hindsight", "success": f"{FOLDER}/data/success"}  # + -<sha>.parquet
PREFERENCE_FILE = f"{FOLDER}/data/preference"
FILES = tuple(f"{stem}-*.parquet" for stem in (*SFT_FILES.values(), PREFERENCE_FILE))  # glob patterns
ROW_GROUP = 256  # rows per row group: fixed, so the bytes do not depend on the stage's batch size

_CALL = pa.struct([("id", pa.string()), ("type", pa.string()),
                   ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(_CALL)),
                     ("tool_call_id", pa.string()), ("weight", pa.int64())])
_COMMON = [("sample_id", pa.string()), ("kind", pa.string()), ("sample_weight", pa.float64())]
_TAIL = [("tools", pa.string()), ("metadata", pa.string())]
SFT_SCHEMA = pa.schema([*_COMMON, ("messages", pa.list_(MESSAGE)), *_TAIL])
PREFERENCE_SCHEMA = pa.schema([*_COMMON, *((k, pa.list_(MESSAGE)) for k in ("prompt", "chosen", "rejected")), *_TAIL])


def _message(m: dict, every_turn: bool) -> dict:
    """`every_turn`: each assistant message gets its 0/1 weight (1 where the annotated row gives none)."""
    weight = int(trains(m)) if every_turn and m["role"] == "assistant" else m.get("weight")
    return {"role": m["role"], "content": m.get("content"), "tool_calls": m.get("tool_calls"),
            "tool_call_id": m.get("tool_call_id"), "weight": weight}


def _record(row: dict, keys: tuple[str, ...]) -> dict:
    meta = row["metadata"]
    return {"sample_id": meta["sample_id"], "kind": meta["kind"], "sample_weight": float(row["weight"]),
            **{k: [_message(m, k == "messages") for m in row[k]] for k in keys},
            "tools": json.dumps(row.get("tools") or [], ensure_ascii=False, sort_keys=True),
            "metadata": json.dumps(meta, ensure_ascii=False, sort_keys=True)}


class _Writers:
    def __init__(self, out: Path, batch_rows: int):
        self.out, self.batch_rows = out, max(1, batch_rows)
        self.open: dict[str, tuple[pq.ParquetWriter, Path, list]] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, schema: pa.Schema, record: dict) -> None:
        if name not in self.open:
            path = self.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            self.open[name] = (pq.ParquetWriter(tmp, schema), path, [])
            self.rows[name] = 0
        writer, _, buffer = self.open[name]
        buffer.append(record)
        self.rows[name] += 1
        if len(buffer) >= self.batch_rows:
            self._flush(name)

    def _flush(self, name: str) -> None:
        writer, _, buffer = self.open[name]
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, schema=writer.schema))
            buffer.clear()

    def close(self) -> dict[str, int]:
        """Rename each file to `<stem>-<sha256[:12]>.parquet`; returns {final file: rows}."""
        out = {}
        for name, (writer, path, _) in self.open.items():
            self._flush(name)
            writer.close()
            tmp = path.with_name(path.name + ".tmp")
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:12]
            final = f"{name}-{digest}.parquet"
            tmp.replace(self.out / final)  # readers never see half a file
            out[final] = self.rows[name]
        return out


def write_parquet(out: Path, sft_lines: Iterable[str], dpo_lines: Iterable[str],
                  batch_rows: int = ROW_GROUP) -> dict[str, int]:
    """The Parquet files from the annotated sft.jsonl and dpo.jsonl lines (already sorted):
    {file: rows} of the files written (none for a split without rows), any earlier one removed."""
    for pattern in FILES:
        for old in Path(out).glob(pattern):
            old.unlink()
    writers = _Writers(Path(out), batch_rows)
    for line in sft_lines:
        row = json.loads(line)
        writers.add(SFT_FILES[row["metadata"]["kind"]], SFT_SCHEMA, _record(row, ("messages",)))
    for line in dpo_lines:
        writers.add(PREFERENCE_FILE, PREFERENCE_SCHEMA, _record(json.loads(line), ("prompt", "chosen", "rejected")))
    return writers.close()


def _file_of(stem: str, written: Iterable[str]) -> str | None:
    return next((f for f in sorted(written) if fnmatch.fnmatch(f, f"{stem}-*.parquet")), None)


def configs(written: Iterable[str]) -> list[dict]:
    """The card's `configs` (YAML header) for the files written, paths relative to `hf/`."""
    written = set(written)
    rel = lambda path: path.removeprefix(FOLDER + "/")  # noqa: E731
    out = []
    sft = [{"split": kind, "path": rel(f)} for kind, stem in SFT_FILES.items() if (f := _file_of(stem, written))]
    if sft:
        out.append({"config_name": "sft", "data_files": sft})
    if f := _file_of(PREFERENCE_FILE, written):
        out.append({"config_name": "preference", "data_files": [{"split": "train", "path": rel(f)}]})
    return out


def finish(out: Path, lines: Lines, written: set[str]) -> dict[str, int]:
    return write_parquet(out, lines("sft.jsonl"), lines("dpo.jsonl"))


def parquet_card(summary: dict, card: str) -> str:
    """hf/README.md: the card under a YAML header whose `configs` name the Parquet files, so that
    `datasets.load_dataset(folder, config, split=...)` finds them."""
    import yaml

    header = {"configs": configs((summary.get("exports") or {}).get("files") or {}),
              "pretty_name": "agenther hindsight-relabeled agent trajectories",
              "tags": ["agents", "tool-use", "hindsight-relabeling"]}
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + card


def publish(out: Path, summary: dict, card: str) -> None:
    """hf/README.md when a Parquet file was written (the dataset's own card names its files), else none."""
    path = Path(out) / CARD
    if not configs((summary.get("exports") or {}).get("files") or {}):
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, parquet_card(summary, card))


TRAINING = """\
**Parquet** (`hf/`): one row per sample. The `sft` config keeps the per-message `weight` (0/1 on every
assistant message, null on the others) next to the messages, and `sample_weight` per row: mask the
weight-0 turns out of the loss with it (or train from `trl/`, where that is done), and apply
`sample_weight` as below."""


def loading(exports: dict) -> str:
    return """\
Parquet (the folder `hf/`, whose README.md is this card with its `configs`):

```python
from datasets import load_dataset

hindsight = load_dataset("path/to/hf", "sft", split="hindsight")
successes = load_dataset("path/to/hf", "sft", split="success")
pairs = load_dataset("path/to/hf", "preference", split="train")
```"""


EXPORTER = Exporter(
    name="hf",
    files=FILES,
    finish=finish,
    publish=publish,
    published=(CARD,),
    describe={
        f"{SFT_FILES['hindsight']}-*.parquet": ("config `sft`, split `hindsight`: `messages` with per-message "
                                                "`weight`, `sample_weight`", "datasets.load_dataset(\"hf\", \"sft\")"),
        f"{SFT_FILES['success']}-*.parquet": ("config `sft`, split `success`", "datasets.load_dataset(\"hf\", \"sft\")"),
        f"{PREFERENCE_FILE}-*.parquet": ("config `preference`, split `train`",
                                         "datasets.load_dataset(\"hf\", \"preference\")"),
    },
    training=TRAINING,
    loading=loading,
)
