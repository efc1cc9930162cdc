"""Property-based tests: any JSON value gives a valid example or a RecordError, and tokens lose nothing."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysft.data.chatml import render_example
from raysft.data.parsing import parse_line
from raysft.data.records import RecordError, split_record
from raysft.data.tokenize import IGNORE_INDEX, tokenize_rendered

text = st.text(max_size=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
                           max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot", "", 3])
message = st.fixed_dictionaries({}, optional={"role": roles, "content": text | json_values, "from": roles,
                                              "value": text | json_values})
messages = st.lists(message, max_size=5) | json_values
record_like = st.fixed_dictionaries({}, optional={k: messages | text for k in (
    "chosen", "rejected", "prompt", "completion", "messages", "conversations", "text")})


def check(value):
    try:
        example = split_record(value) if isinstance(value, dict) else split_record(parse_line(json.dumps(value)))
    except RecordError as exc:
        assert exc.reason and exc.message  # noqa: PT017 (a property: every failure is a located RecordError)
        return None
    rendered = render_example(example)
    assert "".join(s.text for s in rendered.segments) == rendered.text
    return rendered


@settings(max_examples=400, deadline=None)
@given(value=json_values | record_like)
def test_any_json_value_is_an_example_or_a_record_error(value):
    check(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=record_like)
def test_tokens_decode_back_to_the_rendered_text(value, tokenizer):
    rendered = check(value)
    if rendered is None:
        return
    (ids, labels), = tokenize_rendered([rendered], tokenizer)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == rendered.text  # byte-level: nothing lost, nothing duplicated
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
