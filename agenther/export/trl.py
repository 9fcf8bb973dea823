"""TRL: `trl/sft.jsonl` (conversational prompt-completion) and `trl/dpo.jsonl` (conversational preference).

What TRL 1.x's SFTTrainer / DPOTrainer read as they are, from `datasets.load_dataset("json")`:
- SFT: ONE ROW PER TRAINED ASSISTANT TURN (weight 1, or any assistant turn of an original success):
  `prompt` = the sample's messages before that turn, `completion` = [that turn]. SFTTrainer tokenizes
  prompt (with the generation prompt) and prompt + completion and, for prompt-completion data, puts
  the loss on the completion only (`completion_only_loss`, its default for this type: trl
  sft_trainer.py `tokenize_fn` / `build_labels`). So each row trains exactly one weight-1 turn, and
  weight-0 turns, user turns and tool results are only ever context. A `messages` row cannot say
  this: TRL reads no per-message weight, `assistant_only_loss` trains every assistant turn and needs
  a chat template with `{% generation %}` markers, and the default trains every token.
- DPO: `prompt` / `chosen` / `rejected`, chosen and rejected ONE assistant turn each (DPO scores only
  those); a hindsight pair's chosen turn is one of weight 1 (agenther.stages.samples).
- Messages: tool calls carry `arguments` as a JSON object, as Hugging Face chat templates expect
  (Qwen's renders `arguments | tojson`: a JSON-text argument would be encoded twice); no weights.
- `tools`: the tool schemas as JSON text in every row (`"[]"` when the source logged none). TRL
  json-loads a string `tools`; as text the column has one type whatever mix of sources went in
  (as a nested column, `datasets` 4.x fills every schema with the other rows' properties as nulls).
- `sample_id`, `turn` (SFT: the completion's index in the sample's `messages` in the annotated
  `sft.jsonl`) and `sample_weight` (the sample's weight): extra columns the trainers ignore.
"""

from __future__ import annotations

import json

from agenther.export.exporter import Exporter
from agenther.export.formats import trains

SFT_FILE = "trl/sft.jsonl"
DPO_FILE = "trl/dpo.jsonl"


def trl_message(message: dict) -> dict:
    """An OpenAI-format message as a chat-template message (no per-message weight)."""
    out: dict = {"role": message["role"], "content": message.get("content")}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
            for c in message["tool_calls"]
        ]
    if message["role"] == "tool":
        out["tool_call_id"] = message.get("tool_call_id")
    return out


def tools_text(tools: list[dict] | None) -> str:
    return json.dumps(tools or [], ensure_ascii=False, sort_keys=True)


def sft_rows(sft: dict) -> list[dict]:
    """An annotated SFT row (formats.sft_row) as TRL prompt-completion rows, one per trained turn."""
    messages = [trl_message(m) for m in sft["messages"]]
    common = {"tools": tools_text(sft.get("tools")), "sample_id": sft["metadata"]["sample_id"],
              "sample_weight": float(sft["weight"])}
    return [{"prompt": messages[:i], "completion": [messages[i]], "turn": i} | common
            for i, m in enumerate(sft["messages"]) if i and trains(m)]


def dpo_row(dpo: dict) -> dict:
    """An annotated preference row (formats.dpo_row) as a TRL conversational preference row."""
    return {key: [trl_message(m) for m in dpo[key]] for key in ("prompt", "chosen", "rejected")} | {
        "tools": tools_text(dpo.get("tools")), "sample_id": dpo["metadata"]["sample_id"],
        "sample_weight": float(dpo["weight"])}


def rows(name: str, row: dict) -> list[tuple[str, dict]]:
    if name == "sft.jsonl":
        return [(SFT_FILE, r) for r in sft_rows(row)]
    if name == "dpo.jsonl":
        return [(DPO_FILE, dpo_row(row))]
    return []


TRAINING = """\
**TRL** (`trl/sft.jsonl`): conversational prompt-completion, ONE ROW PER TRAINED ASSISTANT TURN.
`prompt` is the sample's conversation before that turn (system, user turns, tool results, earlier
assistant turns, weight-0 ones included, as context), `completion` is that one turn, `turn` its index
in the sample's `messages` (annotated `sft.jsonl`). For prompt-completion data SFTTrainer puts the loss
on the completion only (`completion_only_loss`, its default for this type): each row trains exactly one
weight-1 turn, and no user, tool or weight-0 text is ever a target. Why not `messages` rows: TRL reads
no per-turn weight; `assistant_only_loss=True` trains every assistant turn (the weight-0 ones too) and
needs a chat template with `{% generation %}` markers (TRL 1.16 refuses the Qwen2.5-Coder template
this project ships), and without it every token trains. The price: a
sample with n trained turns is n rows that repeat its history (see the token totals above).
`trl/dpo.jsonl`: DPO scores `chosen` and `rejected` only, one assistant turn each; a hindsight pair's
chosen turn is always one of weight 1. Neither trainer reads a per-sample weight: apply
`sample_weight` as below, or scale each row's loss in a `compute_loss` override."""


def loading(exports: dict) -> str:
    lengths = (exports.get("token_lengths") or {}).get("files") or {}
    sft_max = (lengths.get(SFT_FILE) or {}).get("max_length")
    dpo_max = (lengths.get(DPO_FILE) or {}).get("max_length")
    return f"""\
TRL (the folder `trl/`; `max_length` from the token lengths above, so that no sample is cut; the loss
falls on the completions only, SFTTrainer's default for prompt-completion rows: leave
`completion_only_loss` at its default, `assistant_only_loss` is not needed):

```python
from datasets import load_dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

sft = load_dataset("json", data_files="trl/sft.jsonl", split="train")  # prompt, completion, tools
dpo = load_dataset("json", data_files="trl/dpo.jsonl", split="train")  # prompt, chosen, rejected, tools
SFTTrainer(model=model, train_dataset=sft, args=SFTConfig(output_dir="out", max_length={sft_max}))
DPOTrainer(model=model, train_dataset=dpo, args=DPOConfig(output_dir="out", max_length={dpo_max}))
```"""


EXPORTER = Exporter(
    name="trl",
    files=(SFT_FILE, DPO_FILE),
    rows=rows,
    describe={
        SFT_FILE: ("conversational prompt-completion, one row per trained assistant turn: `prompt`, "
                   "`completion` (that turn), `tools` (JSON text), `sample_id`, `turn`, `sample_weight`",
                   "TRL SFTTrainer via datasets"),
        DPO_FILE: ("conversational preference: `prompt`, `chosen`, `rejected` (one assistant turn each), "
                   "`tools`, `sample_id`, `sample_weight`", "TRL DPOTrainer via datasets"),
    },
    training=TRAINING,
    loading=loading,
    measured=(SFT_FILE, DPO_FILE),
)
