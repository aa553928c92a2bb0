"""The dataset card's text: model answers shown as text, and batchrun's section found again whatever it shows."""

from __future__ import annotations

import html.parser

from batchrun.publish.card import render_card
from batchrun.publish.card_facts import JobFacts
from batchrun.publish.layout import Target

END = "<!-- batchrun:end default -->"
BEGIN = "<!-- batchrun:begin default -->"


def facts(*, template: str = "Write about {topic}.", answers: list[str] | None = None) -> JobFacts:
    answers = answers or ["a plain answer"]
    return JobFacts(
        name="job", fingerprint="f" * 16,
        spec={"task": "chat-completion", "prompt": {"template": template}, "output": {"path": "out"}},
        spec_file=None, identity={"model": "m"}, summary=None, spend=None, ok_rows=len(answers), failed_rows=0,
        failed_retryable=0, tokens={}, features={}, num_bytes={},
        example_rows=[{"id": str(i), "generated_text": a} for i, a in enumerate(answers)],
        example_columns=["id", "generated_text"],
    )


class _Tags(html.parser.HTMLParser):
    """The raw HTML a markdown page would pass through: tags and comments outside code."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag) -> None:
        self.tags.append("/" + tag)

    def handle_comment(self, data) -> None:
        self.comments.append(data)


def test_model_text_in_the_sample_rows_is_escaped_so_it_hides_nothing():
    answers = ["</table><h1>owned</h1>", "an unclosed <!-- comment", "<script>alert(1)</script> & co"]
    card = render_card(None, facts(answers=answers), Target("me/answers"), with_thumbnails=False)
    table = card[card.index("### Sample rows"):card.index(END)]
    parser = _Tags()
    parser.feed(table)
    assert parser.tags == [] and parser.comments == []  # nothing from the model is markup
    assert "&lt;/table&gt;&lt;h1&gt;owned&lt;/h1&gt;" in table and "an unclosed &lt;!-- comment" in table
    assert "&amp; co" in table
    assert card.rstrip().endswith(END)  # the section's end is still there, after the rows


def test_a_template_holding_the_end_marker_does_not_duplicate_the_section_on_each_push():
    template = f"Answer, then write {END} and stop.\n{END}\n{BEGIN}"
    target = Target("me/answers")
    first = render_card(None, facts(template=template), target, with_thumbnails=False)
    second = render_card(first, facts(template=template), target, with_thumbnails=False)
    third = render_card(second + "\nMy own notes.\n", facts(template=template), target, with_thumbnails=False)
    assert second == first
    assert third.count("## Config `default`") == 1 and third.count("Prompt template:") == 1
    assert third.rstrip().endswith("My own notes.")


def test_the_users_prose_around_the_section_is_kept_and_a_marker_quoted_in_a_fence_is_not_taken():
    target = Target("me/answers")
    first = render_card(None, facts(), target, with_thumbnails=False)
    head, rest = first.split(BEGIN, 1)
    user = head + f"Intro.\n\n````\n{BEGIN}\n```\n{END}\n````\n\n" + BEGIN + rest + "\nOutro.\n"
    again = render_card(user, facts(answers=["another answer"]), target, with_thumbnails=False)
    assert "Intro." in again and again.rstrip().endswith("Outro.")
    assert f"````\n{BEGIN}\n```\n{END}\n````" in again  # the user's quoted markers are untouched
    assert "another answer" in again and "a plain answer" not in again
    assert again.count("## Config `default`") == 1
