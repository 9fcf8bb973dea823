"""TRL: `trl/sft.jsonl` (conversational SFT) and `trl/dpo.jsonl` (conversational preference).

What TRL 1.x's SFTTrainer / DPOTrainer read as they are, from `datasets.load_dataset("json")`:
- `messages` (SFT) or `prompt` / `chosen` / `rejected` (DPO): message lists whose tool calls carry
  `arguments` as a JSON object, as Hugging Face chat templates expect (Qwen's renders
  `arguments | tojson`: a JSON-text argument would be encoded twice);
- `tools`: the tool schemas as JSON text in every row (`"[]"` when the source logged none). TRL
  json-loads a string `tools`; as text the column has one type whatever mix of sources went in
  (as a nested column, `datasets` 4.x fills every schema with the other rows' properties as nulls);
- `sample_id` and `weight` (the sample's weight, see the card): extra columns the trainers ignore;
  the lineage of a sample is in the annotated `sft.jsonl` / `dpo.jsonl` under the same
  `metadata.sample_id`. Per-turn 0/1 weights are not carried (TRL reads none): see the card.
"""

from __future__ import annotations

import json

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


def sft_row(sft: dict) -> dict:
    """An annotated SFT row (formats.sft_row) as a TRL conversational SFT row."""
    return {"messages": [trl_message(m) for m in sft["messages"]], "tools": tools_text(sft.get("tools")),
            "sample_id": sft["metadata"]["sample_id"], "weight": float(sft["weight"])}


def dpo_row(dpo: dict) -> dict:
    """An annotated preference row (formats.dpo_row) as a TRL conversational preference row."""
    return {key: [trl_message(m) for m in dpo[key]] for key in ("prompt", "chosen", "rejected")} | {
        "tools": tools_text(dpo.get("tools")), "sample_id": dpo["metadata"]["sample_id"],
        "weight": float(dpo["weight"])}
