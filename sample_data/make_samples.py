"""Regenerate the small sample inputs that the jobs in ``jobs/`` read.

    .venv/bin/python sample_data/make_samples.py

Writes, next to this script and deterministically (no randomness, no clock):

- ``prompts.parquet``: 200 rows of ``id`` (int64) and ``topic`` (string);
- ``questions.jsonl``: 50 rows of ``qid`` (string) and ``question``;
- ``haiku_dataset/``: a ``datasets`` dataset written by ``save_to_disk``, 100 rows of ``title`` and
  ``theme``;
- ``conversations.parquet``: 40 chat conversations (``id``, ``messages``: ``[{role, content}]``, the
  conversational format of ``datasets``), each ending on a user turn;
- ``openai_batch.jsonl``: 30 OpenAI Batch request lines, chat completions and text completions.

The files are committed as sample data; every one stays well under 100 KB.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent

SUBJECTS = [
    "the sea", "autumn leaves", "a lighthouse", "city rain", "an old library", "the first snow",
    "a mountain pass", "a cup of tea", "the night train", "a garden at dawn", "a forgotten key",
    "the moon over a field", "a harbour at dusk", "migrating birds", "a desert well", "a clock tower",
    "wild strawberries", "a fox in winter", "a paper boat", "the smell of bread", "a thunderstorm",
    "a quiet river", "an empty theatre", "a kite in the wind", "fireflies",
]  # fmt: skip
ANGLES = ["", " at midnight", " seen by a child", " in the year 3000", " from far away", " after a long journey",
          " in spring", " remembered decades later"]  # fmt: skip

QUESTION_STEMS = [
    "Why is the sky blue",
    "How do bees make honey",
    "What causes the tides",
    "Why do cats purr",
    "How does a rainbow form",
    "What makes bread rise",
    "Why do leaves change colour in autumn",
    "How do airplanes stay in the air",
    "What is the speed of sound",
    "Why is the sea salty",
]
QUESTION_TAILS = ["?", ", in one sentence?", ", explained to a child?", ", in simple terms?", ", briefly?"]

HAIKU_THEMES = ["seasons", "water", "animals", "night", "travel", "silence", "home", "light", "weather", "time"]
HAIKU_TITLES = ["Morning", "Echo", "Drift", "Lantern", "Threshold", "Stillness", "Harvest", "Ember", "Tide", "Path"]


def prompts_table() -> pa.Table:
    """200 varied poem topics with integer ids 1..200."""
    topics = []
    for i in range(200):
        # Step through subjects and angles with coprime strides so neighbours differ.
        topics.append(SUBJECTS[(i * 7) % len(SUBJECTS)] + ANGLES[(i * 3) % len(ANGLES)])
    return pa.table({"id": pa.array(range(1, 201), pa.int64()), "topic": pa.array(topics, pa.string())})


def questions() -> list[dict[str, str]]:
    """50 questions with string ids q001..q050."""
    rows = []
    for i in range(50):
        stem = QUESTION_STEMS[i % len(QUESTION_STEMS)]
        tail = QUESTION_TAILS[(i // len(QUESTION_STEMS)) % len(QUESTION_TAILS)]
        rows.append({"qid": f"q{i + 1:03d}", "question": stem + tail})
    return rows


def write_haiku_dataset(folder: Path) -> None:
    """100 haiku prompts (title, theme) as a ``datasets`` folder written by ``save_to_disk``."""
    import datasets

    datasets.disable_progress_bars()
    titles = [f"{HAIKU_TITLES[i % 10]} {i // 10 + 1}" for i in range(100)]
    themes = [HAIKU_THEMES[(i * 3) % 10] for i in range(100)]
    features = datasets.Features({"title": datasets.Value("string"), "theme": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"title": titles, "theme": themes}, features=features)
    if folder.exists():
        shutil.rmtree(folder)
    dataset.save_to_disk(str(folder))


def conversations_table() -> pa.Table:
    """40 conversations of one to three exchanges, the last turn always the user's (the job answers it)."""
    rows = []
    for i in range(40):
        stem = QUESTION_STEMS[i % len(QUESTION_STEMS)]
        messages = []
        if i % 4 == 0:
            messages.append({"role": "system", "content": "You are a patient science teacher."})
        messages.append({"role": "user", "content": stem + "?"})
        for turn in range(i % 3):
            messages.append({"role": "assistant", "content": f"Here is a short answer, part {turn + 1}."})
            messages.append({"role": "user", "content": QUESTION_TAILS[(i + turn) % len(QUESTION_TAILS)].strip(" ,?")
                             or "Tell me more."})
        rows.append({"id": f"c{i + 1:03d}", "messages": messages})
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                     "messages": pa.array([r["messages"] for r in rows], pa.list_(message))})


def openai_batch_lines() -> list[dict]:
    """30 OpenAI Batch request lines: two chat completions for every text completion."""
    lines = []
    for i in range(30):
        question = QUESTION_STEMS[i % len(QUESTION_STEMS)] + QUESTION_TAILS[i % len(QUESTION_TAILS)]
        if i % 3 == 2:
            body = {"model": "gpt2", "prompt": f"Question: {question}\nAnswer:", "max_tokens": 24}
            url = "/v1/completions"
        else:
            body = {"model": "tgi", "messages": [{"role": "system", "content": "Answer in one sentence."},
                                                 {"role": "user", "content": question}], "max_tokens": 32}
            url = "/v1/chat/completions"
        lines.append({"custom_id": f"request-{i + 1}", "method": "POST", "url": url, "body": body})
    return lines


def main() -> None:
    pq.write_table(prompts_table(), HERE / "prompts.parquet")
    with open(HERE / "questions.jsonl", "w", encoding="utf-8") as f:
        for row in questions():
            f.write(json.dumps(row) + "\n")
    write_haiku_dataset(HERE / "haiku_dataset")
    pq.write_table(conversations_table(), HERE / "conversations.parquet")
    with open(HERE / "openai_batch.jsonl", "w", encoding="utf-8") as f:
        for line in openai_batch_lines():
            f.write(json.dumps(line) + "\n")
    for path in sorted(HERE.rglob("*")):
        if path.is_file() and path.suffix != ".py":
            print(f"{path.relative_to(HERE.parent)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
