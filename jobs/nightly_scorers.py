"""A user's own scorer for jobs/nightly_eval.yaml: called with the row, returns a dict of numbers."""


def answer_shape(row: dict) -> dict:
    """Words in the answer, and whether it ends a sentence: two columns, declared in the spec."""
    text = row.get("generated_text") or ""
    return {"words": len(text.split()), "ends_sentence": 1.0 if text.rstrip().endswith(".") else 0.0}
