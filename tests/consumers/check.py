"""The exports' real consumers, run INSIDE a consumer environment (not the pipeline's .venv):
tests/test_consumers.py runs this file with .venv-consumers/bin/python (datasets + TRL) or
.venv-llamafactory/bin/python (LLaMA-Factory with its own pins) on an output folder the pipeline
wrote, and reads the JSON report it prints last. Nothing here downloads: the tokenizer is built
from a local GGUF, the model from a config.

    python check.py trl OUT_DIR GGUF           -> {"datasets": {file: rows}, "trl": {...},
                                                  "sample_weights": {file: {...}}}
    python check.py parquet OUT_DIR            -> {"datasets": {parquet file: rows}}
    python check.py together OUT_DIR ...       -> {"datasets": {JSONL file: rows of all runs, loaded at once}}
    python check.py llamafactory OUT_DIR GGUF  -> {"llamafactory": {dataset: {...}}, "labels": {...}}
    python check.py smoke OUT_DIR SMOLLM2_GGUF TEMPLATE_GGUF -> {"smoke": {"sft": {...}, "dpo": {...}}}

Labels (`labels` in the reports): what each trainer's own data path labels, row by row, against the
turns the annotated files weigh (the ground truth: `sft.jsonl` has a 0/1 `weight` on each assistant
message, or none on a success's, which all train; `sharegpt.jsonl` has `metadata.turn_weights`).
Each sample's whole conversation is tokenized the consumer's way, and each assistant turn's tokens
located in it; every row the trainer prepared must be a prefix of its sample's tokens, so each
labelled token of a row falls in one turn of the sample, or in none (user, tool or system text).
The training configuration is the one the dataset card gives (LLaMA-Factory: its `mask_history`
and `cutoff_len` are read from the card).

Each check raises (non-zero exit) on a broken export; counts are compared by the test.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import sys
import tempfile
from collections import Counter
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


def parquet_splits(out: Path):
    """The Parquet dataset through its card's configs: (file, config, split, dataset) per split."""
    import yaml
    from datasets import load_dataset

    card = (out / "hf" / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(card.split("---\n")[1])
    for config in header["configs"]:
        for entry in config["data_files"]:
            ds = load_dataset(str(out / "hf"), config["config_name"], split=entry["split"])
            yield f"hf/{entry['path']}", config["config_name"], entry["split"], ds


def load_parquet_dataset(out: Path) -> dict[str, int]:
    """Rows per Parquet file (split)."""
    rows = {}
    for name, config, split, ds in parquet_splits(out):
        rows[name] = len(ds)
        if config == "sft":
            assert set(ds["kind"]) == {split}, (name, set(ds["kind"]))
    return rows


def parquet_sample_weights(out: Path) -> dict:
    """sample_weight per Parquet file; for the sft config also the per-message weights as loaded:
    {0/1/None: count} over assistant messages (every one must have its 0/1) and over the others."""
    report = {}
    for name, config, _, ds in parquet_splits(out):
        report[name] = sample_weights(ds)
        if config == "sft":
            seen = Counter((m["role"] == "assistant", m["weight"]) for row in ds["messages"] for m in row)
            report[name]["message_weights"] = {f"{'assistant' if a else 'other'}:{w}": n
                                               for (a, w), n in sorted(seen.items(), key=str)}
    return report


def tokenizer_from_gguf(gguf: Path):
    """The GGUF's tokenizer and chat template. Reading them from the GGUF takes ~25 s: with
    $CONSUMER_TOKENIZERS set (tests/test_consumers.py), the tokenizer is saved there once per file
    and transformers version (save_pretrained) and read back from there afterwards."""
    import transformers
    from transformers import AutoTokenizer

    cache = os.environ.get("CONSUMER_TOKENIZERS")
    stat = gguf.stat()
    saved = Path(cache) / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-{transformers.__version__}" if cache else None
    if saved is not None and saved.is_dir():
        tok = AutoTokenizer.from_pretrained(str(saved))
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if saved is not None:
            tmp = Path(tempfile.mkdtemp(dir=cache))
            tok.save_pretrained(str(tmp))
            tmp.rename(saved)  # whole or not at all
    assert tok.chat_template, "the GGUF carries no chat template"
    return tok


def tiny_model(tok):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def template_message(message: dict) -> dict:
    """An annotated (OpenAI-format) message as chat templates take it: tool-call arguments as
    objects (keys sorted, as every exported JSON line has them), no weight. Written here, not
    imported: this runs outside the pipeline's environment."""
    out = {"role": message["role"], "content": message.get("content")}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"],
            "arguments": json.loads(json.dumps(json.loads(c["function"]["arguments"] or "{}"), sort_keys=True))}}
            for c in message["tool_calls"]]
    if message["role"] == "tool":
        out["tool_call_id"] = message.get("tool_call_id")
    return out


class Turns:
    """Every sample's whole conversation as token ids, with the span and 0/1 weight of each of its
    model turns: what the labels of the rows are compared with."""

    def __init__(self):
        self.ids: dict[str, list[int]] = {}
        self.spans: dict[str, list[tuple[int, int, int, int]]] = {}  # sample: [(start, end, turn, weight)]

    def add(self, sample: str, ids: list[int], spans: list[tuple[int, int, int, int]]) -> None:
        self.ids[sample], self.spans[sample] = ids, sorted(spans)

    def report(self, rows) -> dict:
        """rows: (sample id, input_ids, labels) per row the trainer prepared (-100: no loss)."""
        trained: Counter = Counter()  # (sample, turn) -> rows that label all of its tokens
        partly: set = set()
        out = Counter()
        for sample, ids, labels in rows:
            full, spans = self.ids[sample], self.spans[sample]
            out["rows"] += 1
            out["tokens"] += len(ids)
            if full[: len(ids)] != list(ids):
                out["rows_not_a_prefix_of_their_sample"] += 1
                continue
            starts = [s for s, _, _, _ in spans]
            hit: Counter = Counter()
            for p, label in enumerate(labels):
                if label == -100:
                    continue
                out["labelled_tokens"] += 1
                k = bisect.bisect_right(starts, p) - 1
                if k >= 0 and p < spans[k][1]:
                    hit[k] += 1
                else:
                    out["labelled_tokens_outside_model_turns"] += 1  # system, user or tool text
            for k, n in hit.items():
                start, end, turn, _ = spans[k]
                if n == end - start:
                    trained[(sample, turn)] += 1
                else:
                    partly.add((sample, turn))
        weights = {(sample, turn): w for sample, spans in self.spans.items() for _, _, turn, w in spans}
        touched = set(trained) | partly
        return dict(out) | {
            "samples": len(self.spans),
            "weight_1_turns": sum(weights.values()),
            "weight_0_turns": sum(1 - w for w in weights.values()),
            "weight_0_turns_trained": sum(1 for t in touched if weights[t] == 0),
            "weight_1_turns_never_trained": sum(1 for t, w in weights.items() if w and t not in touched),
            "weight_1_turns_trained_more_than_once": sum(1 for t, n in trained.items() if weights[t] and n > 1),
            "turns_trained_in_part": len(partly),
        }


def chat_turns(tok, out: Path) -> Turns:
    """The annotated sft.jsonl samples through the tokenizer's chat template. A turn's tokens are
    those that rendering it adds after the conversation before it with the generation prompt: from
    `<|im_start|>assistant\n` (excluded) to the start of the next turn (ChatML: `<|im_end|>\n`
    included)."""
    turns = Turns()
    for row in read_jsonl(out / "sft.jsonl"):
        sample = row["metadata"]["sample_id"]
        messages = [template_message(m) for m in row["messages"]]
        text = _render(tok, messages, row.get("tools"))
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        token_starts = [a for a, _ in encoded["offset_mapping"]]
        spans = []
        for j, m in enumerate(row["messages"]):
            if m["role"] != "assistant":
                continue
            before = _render(tok, messages[:j], row.get("tools"), generation=True)
            through = _render(tok, messages[: j + 1], row.get("tools"))
            assert text.startswith(before) and text.startswith(through), (sample, j)
            spans.append((bisect.bisect_left(token_starts, len(before)), bisect.bisect_left(token_starts, len(through)),
                          j, int(m.get("weight", 1) != 0)))
        turns.add(sample, encoded["input_ids"], spans)
    return turns


def _render(tok, messages: list[dict], tools: list | None, generation: bool = False) -> str:
    return tok.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=generation)


def resampled(data, column: str = "sample_weight") -> int:
    """The card's recipe for a per-sample weight: draw rows in proportion to it."""
    import numpy as np

    weights = np.asarray(data[column], dtype=float)
    drawn = np.random.default_rng(0).choice(len(data), size=len(data), p=weights / weights.sum())
    return len(data.select(drawn))


def sample_weights(data) -> dict:
    if "sample_weight" not in data.column_names:
        return {"absent": True, "rows": len(data)}
    return {"dtype": str(data.features["sample_weight"]), "rows": len(data),
            "sum": round(float(sum(data["sample_weight"])), 6), "resampled_rows": resampled(data)}


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
            ds = trainer.train_dataset
            ids = ds["input_ids"]
            report["sft"] = {"rows_loaded": len(data), "rows_tokenized": len(ids), "max_length": max_length,
                             "longest": max(map(len, ids)), "measured_max": lengths["trl/sft.jsonl"]["max"],
                             "labels": chat_turns(tok, out).report(zip(ds["sample_id"], ids, ds["labels"],
                                                                       strict=True))}
            report["sample_weights"] = {"trl/sft.jsonl": sample_weights(data)}
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
            report.setdefault("sample_weights", {})["trl/dpo.jsonl"] = sample_weights(data)
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
    report: dict = {}
    labels: list = []
    if gguf is not None:
        from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
        from llamafactory.data.template import get_template_and_fix_tokenizer

        tok = tokenizer_from_gguf(gguf)
        template = get_template_and_fix_tokenizer(tok, DataArguments(template="qwen"))
        card = (out / "dataset_card.md").read_text(encoding="utf-8")
        # the training configuration the card gives: mask_history and cutoff_len
        mask_history = re.search(r"^mask_history: true$", card, re.M) is not None
        cutoff_len = int(re.search(r"^cutoff_len: (\d+)$", card, re.M).group(1))
        processor = SupervisedDatasetProcessor(
            template=template, tokenizer=tok, processor=None,
            data_args=DataArguments(template="qwen", mask_history=mask_history, cutoff_len=cutoff_len))
    for attr in get_dataset_list(sorted(info), str(folder)):
        plain = load_dataset("json", data_files=str(folder / info[_name(attr, info)]
                                                   ["file_name"]), split="train")
        aligned = _load_single_dataset(attr, model_args, data_args, training_args)
        empty = sum(1 for row in aligned if not row["_prompt"] or not row["_response"])
        tools = sum(1 for row in aligned if row["_tools"])
        report[_name(attr, info)] = {"rows_loaded": len(aligned), "rows_json": len(plain),
                                     "dropped_by_converter": empty, "rows_with_tools": tools,
                                     "columns": sorted(plain.column_names)}
        report[_name(attr, info)]["sample_weights"] = sample_weights(plain)
        if gguf is not None:  # its supervised preprocessing, with the card's settings
            encoded = processor.preprocess_dataset(aligned[:])
            assert len(encoded["input_ids"]) == len(plain), "the processor dropped rows"
            # tokens per row as its `qwen` template encodes it: a row it had to cut is cutoff_len long
            report[_name(attr, info)]["longest"] = max(map(len, encoded["input_ids"]))
            labels += zip(plain["sample_id"], encoded["input_ids"], encoded["labels"], strict=True)
    if gguf is None:
        return {"llamafactory": report}
    return {"llamafactory": report, "labels": lf_turns(template, tok, out).report(labels) | {
        "mask_history": mask_history, "cutoff_len": cutoff_len}}


ROLES = {"human": "user", "gpt": "assistant", "function_call": "function", "observation": "observation"}


def lf_turns(template, tok, out: Path) -> Turns:
    """The annotated sharegpt.jsonl samples through LLaMA-Factory's template: each sample's
    (prompt, response) pairs, the response of pair k being conversations[2k + 1] (system is a column)."""
    turns = Turns()
    for row in read_jsonl(out / "sharegpt.jsonl"):
        conversations = row["conversations"]
        weights = row["metadata"].get("turn_weights") or [int(t["from"] in ("gpt", "function_call"))
                                                          for t in conversations]
        messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
        ids, spans = [], []
        for k, (source, target) in enumerate(template.encode_multiturn(tok, messages, row["system"],
                                                                        row.get("tools") or "")):
            ids += source
            spans.append((len(ids), len(ids) + len(target), 2 * k + 1, weights[2 * k + 1]))
            ids += target
        turns.add(row["metadata"]["sample_id"], ids, spans)
    return turns


def _name(attr, info: dict) -> str:
    """The dataset_info.json entry of a parsed DatasetAttr (matched on its file)."""
    return next(name for name, entry in info.items() if entry["file_name"] == attr.dataset_name)


SMOKE_LENGTH = 128  # tokens per row in the train smoke (the end of the row: the completion and what led to it)


def train_smoke(out: Path, gguf: Path, template_gguf: Path) -> dict:
    """The shipped SmolLM2-135M (its GGUF weights, dequantized by transformers) trained on CPU with
    TRL's trainers on this export: 10 SFTTrainer steps over two rows of trl/sft.jsonl (five epochs of
    the same two rows, so the first and the last epoch's losses compare), then one DPOTrainer step on
    a row of trl/dpo.jsonl. Rows are cut to their last SMOKE_LENGTH tokens (`keep_end`: the trained
    turn stays whole) so the smoke fits CI's time. SmolLM2's own chat template cannot render a
    tool-call turn (null content), so the rows are rendered with the tool-calling template of the
    other shipped model (`template_gguf`: Qwen2.5's ChatML, whose markers are SmolLM2's too)."""
    import copy
    import math
    import time

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tok = tokenizer_from_gguf(gguf)
    tok.chat_template = tokenizer_from_gguf(template_gguf).chat_template
    started = time.monotonic()
    # transformers dequantizes the GGUF's weights to float32 but marks the model as quantized, which
    # its Trainer refuses to fine-tune: the same weights go into a plain model of the same config
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    report: dict = {"model": gguf.name, "parameters": sum(p.numel() for p in model.parameters()),
                    "load_seconds": round(time.monotonic() - started, 1)}
    common = {"report_to": "none", "use_cpu": True, "dataset_num_proc": None, "save_strategy": "no",
              "gradient_checkpointing": False,  # TRL's default trades time for memory: time is short here
              "logging_steps": 1, "per_device_train_batch_size": 1, "lr_scheduler_type": "constant",
              "max_length": SMOKE_LENGTH, "truncation_mode": "keep_end", "seed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        sft = load_dataset("json", data_files=str(out / "trl/sft.jsonl"), split="train")
        rows = sft.filter(lambda r: r["sample_id"].startswith("hindsight:")).select(range(2))
        started = time.monotonic()
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows,
                             args=SFTConfig(output_dir=tmp, max_steps=10, learning_rate=1e-4, **common))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        report["sft"] = {"steps": trainer.state.global_step, "losses": [round(x, 4) for x in losses],
                         "rows": list(rows["sample_id"]), "labelled_tokens": [sum(x != -100 for x in r)
                                                                       for r in trainer.train_dataset["labels"]],
                         "seconds": round(time.monotonic() - started, 1)}
        assert all(math.isfinite(x) for x in losses), losses

        dpo = load_dataset("json", data_files=str(out / "trl/dpo.jsonl"), split="train").select(range(1))
        started = time.monotonic()
        reference = copy.deepcopy(model).eval()  # the SFT model as DPO's reference (TRL would load it by name)
        trainer = DPOTrainer(model=model, ref_model=reference, processing_class=tok, train_dataset=dpo,
                             args=DPOConfig(output_dir=tmp, max_steps=1, learning_rate=1e-5, **common))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        report["dpo"] = {"steps": trainer.state.global_step, "losses": [round(x, 4) for x in losses],
                         "rows": list(dpo["sample_id"]), "seconds": round(time.monotonic() - started, 1)}
    return report


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if mode == "trl":
        trl = check_trl(out, Path(argv[2]))
        report = {"datasets": load_json_files(out) | load_parquet_dataset(out),
                  "sample_weights": trl.pop("sample_weights", {}) | parquet_sample_weights(out), "trl": trl}
    elif mode == "together":
        report = {"datasets": load_together([Path(a) for a in argv[1:]])}
    elif mode == "parquet":
        report = {"datasets": load_parquet_dataset(out)}
    elif mode == "llamafactory":
        report = check_llamafactory(out, Path(argv[2]) if len(argv) > 2 else None)
    elif mode == "smoke":
        report = {"smoke": train_smoke(out, Path(argv[2]), Path(argv[3]))}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(REPORT + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
