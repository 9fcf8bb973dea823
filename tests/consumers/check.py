"""The exports' real consumers, run INSIDE a consumer environment (not the pipeline's .venv):
tests/test_consumers.py runs this file with .venv-consumers/bin/python (datasets + TRL) or
.venv-llamafactory/bin/python (LLaMA-Factory with its own pins) on an output folder the pipeline
wrote, and reads the JSON report it prints last. Nothing here downloads: the tokenizer is built
from a local GGUF, the model from a config.

    python check.py trl OUT_DIR GGUF           -> {"datasets": {file: rows}, "trl": {...}}
    python check.py parquet OUT_DIR            -> {"datasets": {parquet file: rows}}
    python check.py together OUT_DIR ...       -> {"datasets": {JSONL file: rows of all runs, loaded at once}}
    python check.py llamafactory OUT_DIR GGUF  -> {"llamafactory": {dataset: {...}}}

Each check raises (non-zero exit) on a broken export; counts are compared by the test.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

REPORT = "CONSUMER-REPORT "


def load_json_files(out: Path) -> dict[str, int]:
    """Every JSONL export, as `datasets.load_dataset("json")` reads it: rows per file."""
    from datasets import load_dataset

    rows = {}
    for path in sorted(out.rglob("*.jsonl")):
        name = str(path.relative_to(out))
        rows[name] = len(load_dataset("json", data_files=str(path), split="train"))
    return rows


def load_together(outs: list[Path]) -> dict[str, int]:
    """Each JSONL file meant for `datasets` (trl/, llamafactory/) of several runs loaded in ONE
    `load_dataset` call (runs over different sources must agree on every column and its type):
    rows per file name. (openai/ and the annotated files keep `tools` as objects, OpenAI's format:
    each run's file loads alone, files of runs over different sources do not load in one call.)"""
    from datasets import load_dataset

    names = sorted({str(p.relative_to(out)) for out in outs for folder in ("trl", "llamafactory")
                    for p in (out / folder).glob("*.jsonl")})
    return {name: len(load_dataset("json", data_files=[str(out / name) for out in outs if (out / name).exists()],
                                   split="train"))
            for name in names}


def load_parquet_dataset(out: Path) -> dict[str, int]:
    """The Parquet dataset through its card's configs: rows per file (split)."""
    import yaml
    from datasets import load_dataset

    card = (out / "hf" / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(card.split("---\n")[1])
    rows = {}
    for config in header["configs"]:
        for entry in config["data_files"]:
            ds = load_dataset(str(out / "hf"), config["config_name"], split=entry["split"])
            rows[f"hf/{entry['path']}"] = len(ds)
            if config["config_name"] == "sft":
                assert set(ds["kind"]) == {entry["split"]}, (entry, set(ds["kind"]))
    return rows


def tokenizer_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert tok.chat_template, "the GGUF carries no chat template"
    return tok


def tiny_model(tok):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def check_trl(out: Path, gguf: Path) -> dict:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    summary = json.loads((out / "summary.json").read_text())
    lengths = summary["exports"]["token_lengths"]["files"]
    tok = tokenizer_from_gguf(gguf)
    report: dict = {"tokenizer": type(tok).__name__}
    with tempfile.TemporaryDirectory() as tmp:
        common = {"output_dir": tmp, "report_to": "none", "use_cpu": True, "dataset_num_proc": None}
        if (out / "trl/sft.jsonl").exists():
            data = load_dataset("json", data_files=str(out / "trl/sft.jsonl"), split="train")
            max_length = lengths["trl/sft.jsonl"]["max_length"]
            trainer = SFTTrainer(model=tiny_model(tok), processing_class=tok, train_dataset=data,
                                 args=SFTConfig(max_length=max_length, **common))
            ids = trainer.train_dataset["input_ids"]
            report["sft"] = {"rows_loaded": len(data), "rows_tokenized": len(ids), "max_length": max_length,
                             "longest": max(map(len, ids)), "measured_max": lengths["trl/sft.jsonl"]["max"]}
        if (out / "trl/dpo.jsonl").exists():
            data = load_dataset("json", data_files=str(out / "trl/dpo.jsonl"), split="train")
            for row in data:  # one assistant turn each side: no user or tool text is a target
                assert [m["role"] for m in row["chosen"]] == ["assistant"], row["sample_id"]
                assert [m["role"] for m in row["rejected"]] == ["assistant"], row["sample_id"]
            max_length = lengths["trl/dpo.jsonl"]["max_length"]
            trainer = DPOTrainer(model=tiny_model(tok), ref_model=tiny_model(tok), processing_class=tok, train_dataset=data,
                                 args=DPOConfig(max_length=max_length, **common))
            ds = trainer.train_dataset
            longest, environment_text = 0, 0
            for prompt, chosen, rejected in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True):
                longest = max(longest, len(prompt) + len(chosen), len(prompt) + len(rejected))
                for side in (chosen, rejected):
                    text = tok.decode(side)
                    # Qwen renders user turns and tool results as <|im_start|>user (tool results wrapped
                    # in <tool_response>): neither may be in a completion
                    environment_text += "<|im_start|>user" in text or "<tool_response>" in text
            report["dpo"] = {"rows_loaded": len(data), "rows_tokenized": len(ds), "max_length": max_length,
                             "longest": longest, "measured_max": lengths["trl/dpo.jsonl"]["max"],
                             "completions_with_user_or_tool_text": environment_text}
    return report


def check_llamafactory(out: Path, gguf: Path | None = None) -> dict:
    """LLaMA-Factory's own parser and sharegpt loader on llamafactory/ and its dataset_info.json."""
    from types import SimpleNamespace

    from datasets import load_dataset
    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments
    from transformers import Seq2SeqTrainingArguments

    folder = out / "llamafactory"
    info = json.loads((folder / "dataset_info.json").read_text())
    data_args = DataArguments(dataset_dir=str(folder), dataset=",".join(sorted(info)), overwrite_cache=True)
    model_args = SimpleNamespace(cache_dir=None, hf_hub_token=None)  # read by the loader for hub datasets only
    training_args = Seq2SeqTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True)
    report = {}
    if gguf is not None:
        from llamafactory.data.template import get_template_and_fix_tokenizer

        tok = tokenizer_from_gguf(gguf)
        template = get_template_and_fix_tokenizer(tok, DataArguments(template="qwen"))
    for attr in get_dataset_list(sorted(info), str(folder)):
        plain = load_dataset("json", data_files=str(folder / info[_name(attr, info)]
                                                   ["file_name"]), split="train")
        aligned = _load_single_dataset(attr, model_args, data_args, training_args)
        empty = sum(1 for row in aligned if not row["_prompt"] or not row["_response"])
        tools = sum(1 for row in aligned if row["_tools"])
        report[_name(attr, info)] = {"rows_loaded": len(aligned), "rows_json": len(plain),
                                     "dropped_by_converter": empty, "rows_with_tools": tools,
                                     "columns": sorted(plain.column_names)}
        if gguf is not None:  # tokens per row as its `qwen` template encodes it (what cutoff_len bounds)
            report[_name(attr, info)]["longest"] = max(_lf_length(template, tok, row) for row in aligned)
    return report


def _lf_length(template, tok, row: dict) -> int:
    pairs = template.encode_multiturn(tok, row["_prompt"] + row["_response"], row["_system"], row["_tools"])
    return sum(len(a) + len(b) for a, b in pairs) + (1 if template.efficient_eos else 0)


def _name(attr, info: dict) -> str:
    """The dataset_info.json entry of a parsed DatasetAttr (matched on its file)."""
    return next(name for name, entry in info.items() if entry["file_name"] == attr.dataset_name)


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if mode == "trl":
        report = {"datasets": load_json_files(out) | load_parquet_dataset(out), "trl": check_trl(out, Path(argv[2]))}
    elif mode == "together":
        report = {"datasets": load_together([Path(a) for a in argv[1:]])}
    elif mode == "parquet":
        report = {"datasets": load_parquet_dataset(out)}
    elif mode == "llamafactory":
        report = {"llamafactory": check_llamafactory(out, Path(argv[2]) if len(argv) > 2 else None)}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(REPORT + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
