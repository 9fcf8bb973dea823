"""LLaMA-Factory: `llamafactory/hindsight.jsonl`, `llamafactory/success.jsonl` and the
`llamafactory/dataset_info.json` that names them (datasets `agenther_hindsight`, `agenther_success`).

Rows are sharegpt with LLaMA-Factory's default tags, ONE ROW PER TRAINED MODEL TURN: the sample's
conversation up to and including that `gpt` / `function_call` turn, to be trained with
`mask_history: true`. Why (LLaMA-Factory 0.9.5, read in its source): sharegpt has no per-message
loss field (data/converter.py SharegptDatasetConverter keeps role and content only), and the
supervised processor (data/processor/supervised.py) labels the target of every (prompt, response)
pair unless `mask_history`, which labels the LAST pair only (and keeps it first when `cutoff_len`
cuts). So a row that ends on the turn to train and `mask_history: true` train exactly that turn;
earlier turns of the row, the weight-0 ones included, are context. Without `mask_history` every
model turn of every row would train, the earlier ones once per later row: the card says so.

Every row has every column the mapping names (`conversations`, `system`, `tools`; `tools` is "" when
the source logged no schemas): the converter reads each mapped column of each row, and a missing
one is a KeyError. Hindsight samples and original successes are separate datasets, so a training
YAML picks either or both. `sample_id`, `turn` (the index of the trained turn in the sample's
`conversations` in the annotated `sharegpt.jsonl`) and `sample_weight` are extra columns
LLaMA-Factory does not read (it keeps mapped columns only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from agenther.export.exporter import Exporter, Lines
from agenther.workdir import write_text_atomic

FOLDER = "llamafactory"
DATASET_INFO = f"{FOLDER}/dataset_info.json"
FILES = {"hindsight": f"{FOLDER}/hindsight.jsonl", "success": f"{FOLDER}/success.jsonl"}
DATASETS = {kind: f"agenther_{kind}" for kind in FILES}
COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
MODEL_TAGS = ("gpt", "function_call")


def file_of(sharegpt: dict) -> str:
    return FILES[sharegpt["metadata"]["kind"]]


def lf_rows(sharegpt: dict) -> list[dict]:
    """An annotated sharegpt row (formats.sharegpt_row) as LLaMA-Factory rows, one per trained model
    turn (metadata.turn_weights 1; every model turn when the sample has no turn weights)."""
    turns = sharegpt["conversations"]
    weights = sharegpt["metadata"].get("turn_weights") or [1] * len(turns)
    common = {"system": sharegpt["system"], "tools": sharegpt.get("tools") or "",
              "sample_id": sharegpt["metadata"]["sample_id"], "sample_weight": float(sharegpt["weight"])}
    return [{"conversations": turns[: k + 1], "turn": k} | common
            for k, (turn, w) in enumerate(zip(turns, weights, strict=True)) if turn["from"] in MODEL_TAGS and w]


def rows(name: str, row: dict) -> list[tuple[str, dict]]:
    if name != "sharegpt.jsonl":
        return []
    return [(file_of(row), r) for r in lf_rows(row)]


def dataset_info(written: set[str]) -> dict:
    """The dataset_info.json entries of the files written (paths relative to its folder).

    `columns` names `messages` too: once `columns` is given, LLaMA-Factory's parser takes every
    column from it. Tags are left at their defaults: giving `tags` would reset any unlisted one."""
    return {
        DATASETS[kind]: {"file_name": path.removeprefix(FOLDER + "/"), "formatting": "sharegpt", "columns": COLUMNS}
        for kind, path in FILES.items()
        if path in written
    }


def finish(out: Path, lines: Lines, written: set[str]) -> dict[str, int]:
    info = dataset_info(written)
    if not info:
        return {}
    (out / FOLDER).mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / DATASET_INFO, json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return {DATASET_INFO: len(info)}  # its "rows": the datasets it names


TRAINING = """\
**LLaMA-Factory** (`llamafactory/`): sharegpt, ONE ROW PER TRAINED MODEL TURN: the sample's
conversation up to and including that `gpt` / `function_call` turn (`turn`: its index in the
annotated `sharegpt.jsonl`). Train with **`mask_history: true`**: LLaMA-Factory 0.9.5 then labels only
the last turn of each row, so each row trains exactly one weight-1 turn and the earlier turns (weight-0
ones included) are context. Its sharegpt format has no per-message loss field, and `mask_history` is
the one switch that keeps earlier turns out of the loss: without it every model turn of every row
trains, the earlier ones once per later row. No user or tool text is a target either way
(`train_on_prompt` stays false). LLaMA-Factory reads no per-sample weight: resample with
`sample_weight` as below and point `dataset_info.json` at the resampled file."""


def cutoff_len(measured: int) -> int:
    """LLaMA-Factory's `cutoff_len` for rows whose longest measures `measured` tokens (0: unmeasured).
    Measured on the TRL files with the model's own chat template; LLaMA-Factory's template writes
    tool schemas and calls in its own words, a few percent longer: 10% headroom, in steps of 256
    (tests/test_consumers.py checks that its preprocessing cuts no row)."""
    return 256 * math.ceil(measured * 1.1 / 256) if measured else 8192


def loading(exports: dict) -> str:
    lengths = (exports.get("token_lengths") or {}).get("files") or {}
    longest = cutoff_len(max((v.get("max_length") or 0 for v in lengths.values()), default=0))
    written = exports.get("files") or {}
    datasets = [DATASETS[kind] for kind, path in FILES.items() if path in written]
    return f"""\
LLaMA-Factory (the folder `llamafactory/`), in the training YAML (`mask_history: true` is what makes
each row train its last turn only):

```yaml
dataset_dir: path/to/llamafactory
dataset: {",".join(datasets) or DATASETS["hindsight"]}
mask_history: true
cutoff_len: {longest}
```"""


EXPORTER = Exporter(
    name="llamafactory",
    files=(*FILES.values(), DATASET_INFO),
    rows=rows,
    finish=finish,
    describe={
        **{path: ("sharegpt, one row per trained model turn (the conversation up to it): `conversations`, "
                  "`system`, `tools`, `sample_id`, `turn`, `sample_weight`",
                  f"LLaMA-Factory with `mask_history: true` (`{DATASETS[kind]}`)") for kind, path in FILES.items()},
        DATASET_INFO: ("the entries of the sharegpt files written", "LLaMA-Factory"),
    },
    training=TRAINING,
    loading=loading,
)
