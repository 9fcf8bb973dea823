"""OpenAI fine-tuning: `openai/sft.jsonl`, the upload file as OpenAI documents it.

Each row: `messages` (Chat Completions messages: tool calls as `tool_calls` with JSON-text
`arguments`, results as `tool` messages) and, when the source logged its tool schemas, `tools` and
`parallel_tool_calls`. Nothing else: sample weights and lineage stay in the annotated `sft.jsonl`
(join on the row order, or on `metadata.sample_id` there). The only weight is OpenAI's own: 0 or 1
on an assistant message of a hindsight sample (0 = context, not trained on).

`tools` is left out, not emptied, when unknown: OpenAI's API rejects an empty `tools` list.
"""

from __future__ import annotations

FILE = "openai/sft.jsonl"


def openai_row(sft: dict) -> dict:
    """An annotated SFT row (formats.sft_row) as an OpenAI upload row."""
    row: dict = {"messages": sft["messages"]}
    if sft.get("tools"):
        row["tools"] = sft["tools"]
        row["parallel_tool_calls"] = any(len(m.get("tool_calls") or []) > 1 for m in sft["messages"])
    return row
