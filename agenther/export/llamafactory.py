"""LLaMA-Factory: `llamafactory/hindsight.jsonl`, `llamafactory/success.jsonl` and the
`llamafactory/dataset_info.json` that names them (datasets `agenther_hindsight`, `agenther_success`).

Rows are sharegpt with LLaMA-Factory's default tags. Every row has every column the mapping names
(`conversations`, `system`, `tools`; `tools` is "" when the source logged no schemas): its
SharegptDatasetConverter reads each mapped column of each row, and a missing one is a KeyError.
Hindsight samples and original successes are separate datasets, so a training YAML picks either
or both (`dataset: agenther_hindsight,agenther_success`). `sample_id` ties a row to its lineage in
the annotated `sharegpt.jsonl` (LLaMA-Factory ignores unmapped columns).
"""

from __future__ import annotations

FOLDER = "llamafactory"
DATASET_INFO = f"{FOLDER}/dataset_info.json"
FILES = {"hindsight": f"{FOLDER}/hindsight.jsonl", "success": f"{FOLDER}/success.jsonl"}
DATASETS = {kind: f"agenther_{kind}" for kind in FILES}
COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}


def file_of(sharegpt: dict) -> str:
    return FILES[sharegpt["metadata"]["kind"]]


def lf_row(sharegpt: dict) -> dict:
    """An annotated sharegpt row (formats.sharegpt_row) as a LLaMA-Factory row."""
    return {"conversations": sharegpt["conversations"], "system": sharegpt["system"],
            "tools": sharegpt.get("tools") or "", "sample_id": sharegpt["metadata"]["sample_id"]}


def dataset_info(written: set[str]) -> dict:
    """The dataset_info.json entries of the files written (paths relative to its folder).

    `columns` names `messages` too: once `columns` is given, LLaMA-Factory's parser takes every
    column from it. Tags are left at their defaults: giving `tags` would reset any unlisted one."""
    return {
        DATASETS[kind]: {"file_name": path.removeprefix(FOLDER + "/"), "formatting": "sharegpt", "columns": COLUMNS}
        for kind, path in FILES.items()
        if path in written
    }
