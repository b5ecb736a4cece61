"""validate_rows / validate_file: every accepted shape, every problem code at its exact line."""

from __future__ import annotations

import json

import pytest

from hone.data.readers import DataError
from hone.data.validate import ValidationReport, format_problems, validate_file, validate_rows, write_rejects
from hone.records import Message, Problem

INSTRUCTION = "Classify into one of: {labels}."


def run(*rows, labels=None, dedupe=True) -> ValidationReport:
    """Validate rows numbered from line 1, as a reader would give them."""
    return validate_rows(list(enumerate(rows, 1)), "d.jsonl", instruction=INSTRUCTION, labels=labels, dedupe=dedupe)


def codes(report):
    return [(p.line, p.code) for p in report.problems]


def only_problem(row, **kw) -> Problem:
    report = run(row, **kw)
    assert report.records == [] and len(report.problems) == 1
    return report.problems[0]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --- accepted shapes -------------------------------------------------------------------------------------

def test_chat_shape_keeps_weights_and_extra_keys_in_meta():
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello", "weight": 0},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "hi", "weight": 1}],
           "id": 7, "metadata": {"k": "v"}}
    [conv] = run(row).records
    assert conv.shape == "chat" and conv.source == "d.jsonl" and conv.line == 1
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[2] == Message("assistant", "hello", 0.0) and conv.messages[1].weight is None
    assert conv.meta == {"id": 7, "metadata": {"k": "v"}}


def test_completion_shape_with_and_without_system():
    report = run({"prompt": "2+2?", "completion": " 4"}, {"prompt": "hi", "completion": "yo", "system": "terse"})
    a, b = report.records
    assert a.messages == [Message("user", "2+2?"), Message("assistant", " 4")]  # content kept verbatim
    assert b.messages == [Message("system", "terse"), Message("user", "hi"), Message("assistant", "yo")]
    assert a.shape == b.shape == "completion" and report.shapes == {"completion": 2}


def test_instruction_shape_appends_non_empty_input():
    report = run({"instruction": "Translate", "input": "bonjour", "output": "hello"},
                 {"instruction": "Say hi", "input": "", "output": "hi"},
                 {"instruction": "Say bye", "output": "bye", "source": "x"})
    a, b, c = report.records
    assert a.messages == [Message("user", "Translate\n\nbonjour"), Message("assistant", "hello")]
    assert b.messages[0].content == "Say hi" and c.messages[0].content == "Say bye"
    assert c.meta == {"source": "x"} and report.shapes == {"instruction": 3}


def test_label_shape_infers_sorted_label_set_and_renders_the_instruction():
    report = run({"text": "refund please", "label": "refund"}, {"text": "bad", "label": ""},
                 {"text": "card declined", "label": " billing "}, {"text": "n", "label": 3})
    assert report.labels == ["3", "billing", "refund"]
    assert codes(report) == [(2, "empty_content")]  # the bad row's label is not in the set
    first = report.records[0]
    assert first.shape == "label" and first.label == "refund"
    assert first.messages == [Message("system", "Classify into one of: 3, billing, refund."),
                              Message("user", "refund please"), Message("assistant", "refund")]
    assert report.records[2].label == "3" and report.shapes == {"label": 3}


def test_given_labels_are_used_and_unknown_labels_rejected():
    report = run({"text": "a", "label": "x"}, {"text": "b", "label": "nope"}, labels=["y", "x"])
    assert report.labels == ["y", "x"]
    assert report.records[0].messages[0].content == "Classify into one of: y, x."
    assert codes(report) == [(2, "unknown_label")]
    assert "'nope'" in report.problems[0].message and "y, x" in report.problems[0].message


def test_instruction_with_other_braces_still_renders():
    instruction = 'Reply as {"label": ...}; one of {labels}'
    report = validate_rows([(1, {"text": "a", "label": "x"})], "d", instruction=instruction)
    assert report.records[0].messages[0].content == 'Reply as {"label": ...}; one of x'


def test_no_label_rows_means_no_labels():
    report = run({"prompt": "a", "completion": "b"})
    assert report.labels == [] and report.rows == 1


def test_chat_wins_over_other_shapes_and_complete_shapes_win_over_partial_ones():
    both = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "prompt": "p", "completion": "c"}
    partial = {"prompt": "p", "text": "t", "label": "l"}
    a, b = run(both, partial).records
    assert a.shape == "chat" and a.meta == {"prompt": "p", "completion": "c"}
    assert b.shape == "label" and b.meta == {"prompt": "p"}


# --- problem codes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, code, words", [
    ({"question": "q", "answer": "a"}, "unknown_shape", ["answer, question", "{prompt, completion}"]),
    ({}, "unknown_shape", ["keys found: none"]),
    ({"prompt": "p"}, "missing_field", ["'completion'"]),
    ({"input": "i", "output": "o"}, "missing_field", ["'instruction'"]),
    ({"text": "t"}, "missing_field", ["'label'"]),
    ({"messages": "hi"}, "bad_type", ["messages", "found string"]),
    ({"messages": ["hi"]}, "bad_type", ["messages[0]", "found string"]),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "bad_type", ["messages[0].content", "found array"]),
    ({"prompt": 5, "completion": "c"}, "bad_type", ["prompt", "found number"]),
    ({"text": "t", "label": [1]}, "bad_type", ["label", "found array"]),
    ({"messages": [{"role": "user"}]}, "missing_field", ["messages[0].content"]),
    ({"messages": []}, "empty_content", ["messages"]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]},
     "empty_content", ["messages[1].content"]),
    ({"prompt": "p", "completion": "  "}, "empty_content", ["completion"]),
    ({"instruction": "i", "output": ""}, "empty_content", ["output"]),
    ({"text": "", "label": "x"}, "empty_content", ["text"]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "unknown_role", ["messages[1].role", "'bot'", "system, user, assistant"]),
    ({"messages": [{"role": "Assistant", "content": "b"}]}, "unknown_role", ["did you mean 'assistant'"]),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
     "no_assistant_turn", ["system, user"]),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "bad_weight", ["messages[1].weight", "0 or 1", "0.5"]),
    ({"messages": [{"role": "user", "content": "u", "weight": 1}, {"role": "assistant", "content": "a"}]},
     "bad_weight", ["messages[0].weight", "only on assistant"]),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": True}]},
     "bad_weight", ["true"]),
])
def test_problem_codes(row, code, words):
    problem = only_problem(row)
    assert problem.code == code and problem.line == 1 and problem.source == "d.jsonl"
    for w in words:
        assert w in problem.message, (w, problem.message)
    assert json.loads(problem.raw) == row


def test_duplicates_name_the_earlier_line_and_ignore_surrounding_whitespace():
    a = {"prompt": "same", "completion": "answer"}
    b = {"prompt": " same\n", "completion": "answer ", "id": 2}
    c = {"messages": [{"role": "user", "content": "same"}, {"role": "assistant", "content": "answer"}]}
    report = run(a, {"prompt": "other", "completion": "x"}, b, c)
    assert codes(report) == [(3, "duplicate"), (4, "duplicate")]
    assert "line 1" in report.problems[0].message
    assert [r.line for r in report.records] == [1, 2]
    assert len(run(a, b, dedupe=False).records) == 2


def test_reader_problems_pass_through_and_one_bad_row_never_affects_others():
    rows = [(1, {"prompt": "a", "completion": "b"}),
            (2, Problem("d.jsonl", 2, "invalid_json", "oops", raw="{")),
            (4, {"prompt": "c"}),
            (5, {"text": "t", "label": "l"})]
    report = validate_rows(rows, "d.jsonl", instruction=INSTRUCTION)
    assert report.rows == 4 and [r.line for r in report.records] == [1, 5]
    assert codes(report) == [(2, "invalid_json"), (4, "missing_field")]
    assert report.shapes == {"completion": 1, "label": 1}


# --- files, formatting, rejects --------------------------------------------------------------------------

def test_validate_file_jsonl_end_to_end(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\n{"prompt": "c", "completion": "d"}\n'
                  b'{"text": "x"}\n{"prompt": "a", "completion": "b"}\n')
    report = validate_file(p, instruction=INSTRUCTION)
    assert report.source == str(p) and report.rows == 5
    assert [(r.line, r.source) for r in report.records] == [(1, str(p)), (3, str(p))]
    assert codes(report) == [(2, "not_utf8"), (4, "missing_field"), (5, "duplicate")]


def test_validate_file_csv_reports_the_line_after_a_multiline_field(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('text,label,note\n"a\nlong\nticket",billing,\n"",refund,x\nok,refund,\n', encoding="utf-8")
    report = validate_file(p, instruction=INSTRUCTION)
    assert [r.line for r in report.records] == [2, 6] and report.labels == ["billing", "refund"]
    assert codes(report) == [(5, "missing_field")]  # empty cell = absent text
    assert report.records[1].meta == {}


def test_validate_file_passes_data_errors_through(tmp_path):
    with pytest.raises(DataError):
        validate_file(tmp_path / "missing.jsonl", instruction=INSTRUCTION)


def test_format_problems_limits_and_counts_the_rest():
    probs = [Problem("f.jsonl", i, code, f"m{i}") for i, code in
             enumerate(["a", "b", "dup", "dup", "dup", "bad", "bad"], 1)]
    text = format_problems(probs, limit=2)
    assert text.splitlines() == ["f.jsonl:1: [a] m1", "f.jsonl:2: [b] m2",
                                 "... and 5 more (codes: dup×3, bad×2)"]
    assert format_problems(probs[:2]) == "f.jsonl:1: [a] m1\nf.jsonl:2: [b] m2"
    assert format_problems([]) == ""


def test_write_rejects_is_jsonl_of_problem_json(tmp_path):
    probs = [Problem("f.jsonl", 3, "invalid_json", "bad", raw="{é"), Problem("f.jsonl", 9, "duplicate", "dup")]
    out = tmp_path / "run" / "rejects.jsonl"
    write_rejects(out, probs)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [p.to_json() for p in probs]
    assert "é" in lines[0]


def test_preference_pairs_given_to_sft_point_to_the_preference_methods(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    report = validate_file(path, instruction="{labels}")
    assert [p.code for p in report.problems] == ["unknown_shape"]
    assert "dpo" in report.problems[0].message and report.problems[0].line == 1
