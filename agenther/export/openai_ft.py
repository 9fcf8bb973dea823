"""OpenAI fine-tuning: `openai/sft.jsonl`, the upload file as OpenAI documents it.

Each row: `messages` (Chat Completions messages: tool calls as `tool_calls` with JSON-text
`arguments`, results as `tool` messages) and, when the source logged its tool schemas, `tools` and
`parallel_tool_calls`. Nothing else: sample weights and lineage stay in the annotated `sft.jsonl`
(the same rows in the same order; `metadata.sample_id` there). The only weight is OpenAI's own: 0 or
1 on an assistant message of a hindsight sample (0 = context, not trained on); OpenAI trains the
assistant messages without one, and never user or tool messages.

`tools` is left out, not emptied, when unknown: OpenAI's API rejects an empty `tools` list.
"""

from __future__ import annotations

from agenther.export.exporter import Exporter

FILE = "openai/sft.jsonl"


def openai_row(sft: dict) -> dict:
    """An annotated SFT row (formats.sft_row) as an OpenAI upload row."""
    row: dict = {"messages": sft["messages"]}
    if sft.get("tools"):
        row["tools"] = sft["tools"]
        row["parallel_tool_calls"] = any(len(m.get("tool_calls") or []) > 1 for m in sft["messages"])
    return row


def rows(name: str, row: dict) -> list[tuple[str, dict]]:
    return [(FILE, openai_row(row))] if name == "sft.jsonl" else []


TRAINING = """\
**OpenAI** (`openai/sft.jsonl`): one row per sample; OpenAI's own per-message `weight` on the
assistant messages of hindsight samples (1 = train, 0 = context only); assistant messages without one
(original successes) train, user and tool messages never do. The upload format has no sample weight:
its rows are those of the annotated `sft.jsonl` in the same order, whose `weight` is the sample's;
resample with it before uploading if you want it applied."""


def loading(exports: dict) -> str:
    return "OpenAI fine-tuning: upload `openai/sft.jsonl` as it is."


EXPORTER = Exporter(
    name="openai",
    files=(FILE,),
    rows=rows,
    describe={FILE: ("`messages`, `tools`, `parallel_tool_calls`; per-assistant-message 0/1 `weight`",
                     "OpenAI fine-tuning upload")},
    training=TRAINING,
    loading=loading,
)
