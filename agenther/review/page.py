"""The review page: one self-contained HTML file (no network, no server). Items are embedded as
JSON and drawn with textContent, so log text never becomes markup. A label (correct / incorrect /
unsure, and a note) is kept in the browser's localStorage as it is given and downloads as JSON,
the file `agenther review score` reads. Also Label Studio's import format and labeling config."""

from __future__ import annotations

import html
import json

LABELS = ("correct", "incorrect", "unsure")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agenther review: __TITLE__</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:1.5rem auto;padding:0 1rem;color:#222}
.item{border:1px solid #ccc;border-radius:6px;padding:.8rem 1rem;margin:1rem 0}
.item.done{border-color:#4a4}.prompt{font-size:1.1rem;background:#f4f7ff;padding:.5rem;border-radius:4px}
.meta{color:#666;font-size:.85rem}pre{white-space:pre-wrap;background:#f6f6f6;padding:.4rem;margin:.2rem 0;font-size:.8rem}
.turn{font-size:.85rem;margin:.15rem 0;padding:.2rem .4rem;border-left:3px solid #ccc;white-space:pre-wrap}
.turn.user{border-color:#57a}.turn.assistant{border-color:#4a4}.turn.w0{border-color:#aaa;color:#777}
.turn .was{color:#a55;text-decoration:line-through}
button{margin-right:.4rem;padding:.3rem .8rem}button.on{background:#333;color:#fff}
textarea{width:100%;height:2.5rem}#bar{position:sticky;top:0;background:#fff;padding:.5rem 0;border-bottom:1px solid #ddd}
</style></head><body>
<div id="bar"><b>agenther review</b> <span id="progress"></span>
 annotator <input id="annotator" placeholder="your name">
 <button id="download">Download labels</button></div>
<p>Is each sample a conversation you would train on? The user side (the first message and every later
user turn, rewritten ones marked with what the user originally said) must ask for <b>fully and exactly</b>
what the run did, as the evidence shows, and every turn that trains (weight 1) must follow from what the
user said before it. <i>correct</i>: yes; <i>incorrect</i>: something asked is not done, something done is
not asked, or a turn contradicts what came before; <i>unsure</i>: the evidence does not tell.</p>
<div id="items"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const key = "agenther-review:" + data.run.run_dir + ":" + data.run.seed;
const saved = JSON.parse(localStorage.getItem(key) || "{}");
const labels = saved.labels || {};
const annotator = document.getElementById("annotator");
annotator.value = saved.annotator || "";
function save() {
  localStorage.setItem(key, JSON.stringify({annotator: annotator.value, labels}));
  const n = Object.values(labels).filter(l => l.label).length;
  document.getElementById("progress").textContent = n + " of " + data.items.length + " labeled";
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
for (const it of data.items) {
  const box = el("div", "item"); box.dataset.id = it.id;
  box.append(el("div", "meta", it.stratum + " · " + it.id));
  box.append(el("div", "prompt", it.hindsight_prompt));
  for (const t of it.turns || []) {
    const line = el("div", "turn " + t.role + (t.weight === 0 ? " w0" : ""));
    const head = "[" + t.step + "] " + t.role.toUpperCase() + (t.weight === null ? "" : " (weight " + t.weight + ")")
      + (t.before === null ? "" : " (rewritten)") + ": ";
    line.append(el("b", null, head), el("span", null, [t.text, ...t.calls.map(c => "CALLS " + c)].filter(x => x).join("\\n")));
    if (t.before !== null) line.append(el("div", "was", "was: " + t.before));
    box.append(line);
  }
  for (const a of it.achievements) {
    box.append(el("div", null, "[" + a.kind + "] " + a.text));
    for (const ev of a.evidence) box.append(el("pre", null, "step " + ev.step + " (" + ev.role + "): " + ev.text));
  }
  const row = el("div"); const note = el("textarea"); note.placeholder = "note";
  const mine = labels[it.id] || {};
  note.value = mine.note || "";
  for (const name of __LABELS__) {
    const b = el("button", "label " + name, name); b.dataset.label = name;
    if (mine.label === name) { b.classList.add("on"); box.classList.add("done"); }
    b.onclick = () => { labels[it.id] = {label: name, note: note.value};
      row.querySelectorAll("button").forEach(x => x.classList.toggle("on", x === b));
      box.classList.add("done"); save(); };
    row.append(b);
  }
  note.oninput = () => { labels[it.id] = Object.assign(labels[it.id] || {}, {note: note.value}); save(); };
  box.append(row, note); document.getElementById("items").append(box);
}
annotator.oninput = save;
document.getElementById("download").onclick = () => {
  const body = JSON.stringify({run: data.run, annotator: annotator.value, labels}, null, 2);
  const a = el("a"); a.href = URL.createObjectURL(new Blob([body], {type: "application/json"}));
  a.download = "labels-" + (annotator.value || "anonymous") + ".json"; a.click();
};
save();
</script></body></html>
"""

LABEL_STUDIO_CONFIG = """<View>
  <Header value="Is the request fully and exactly done by the run, as the evidence shows?"/>
  <Text name="prompt" value="$hindsight_prompt"/>
  <Text name="evidence" value="$evidence"/>
  <Choices name="label" toName="prompt" choice="single" required="true">
    <Choice value="correct"/><Choice value="incorrect"/><Choice value="unsure"/>
  </Choices>
  <TextArea name="note" toName="prompt" placeholder="note"/>
</View>
"""


def render(run: dict, items: list[dict]) -> str:
    data = json.dumps({"run": run, "items": items}, ensure_ascii=False).replace("</", "<\\/")
    return (_PAGE.replace("__TITLE__", html.escape(run["run_dir"])).replace("__LABELS__", json.dumps(list(LABELS)))
            .replace("__DATA__", data))


def _evidence_text(item: dict) -> str:
    lines = []
    for a in item["achievements"]:
        lines.append(f"[{a['kind']}] {a['text']}")
        lines += [f"  step {e['step']} ({e['role']}): {e['text']}" for e in a["evidence"]]
    return "\n".join(lines)


def label_studio_tasks(items: list[dict]) -> list[dict]:
    """Label Studio's JSON import: one task per item; the judges stay out of what is shown."""
    return [{"data": {"id": it["id"], "stratum": it["stratum"], "hindsight_prompt": it["hindsight_prompt"],
                      "evidence": _evidence_text(it)}} for it in items]
