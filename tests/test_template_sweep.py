"""Every real chat template of ../shared/templates on a real tokenizer, over five record shapes (template_corpus.py):
each pair accepted exactly, refused only where the template cannot train the record as written, or excluded where
transformers itself cannot render it; docs/TEMPLATES.md is the sweep's table. Pure Python: no Ray, no torch."""

from __future__ import annotations

import re

import pytest
import template_corpus as corpus

from raysft.data.rendering import control_tokens, conversation


@pytest.fixture(scope="module")
def results():
    return corpus.sweep()


def test_the_docs_table_is_the_sweep(results):
    """docs/TEMPLATES.md lists every template with its verdicts as the sweep finds them today (regenerate it with
    `python tests/template_corpus.py` when a verdict changes on purpose)."""
    with open(corpus.DOC, encoding="utf-8") as f:
        assert f.read() == corpus.table(results)
    assert {path for path, _ in results} == set(corpus.template_paths()) and len(corpus.template_paths()) >= 144


def test_at_least_95_percent_of_the_pairs_a_template_can_train_are_accepted(results):
    """The goal: of the renderable pairs, every one the template can train as written is accepted (refusals only
    for what the template itself drops or for turns nothing ends), and most renderable pairs are accepted."""
    accepted, refused, excluded = corpus.summary(results)
    assert accepted / (accepted + refused - corpus.forced(results)) >= 0.95
    assert accepted / (accepted + refused) >= 0.85 and excluded < 0.15 * len(results)


def _whole(c, shape, kwargs):
    """The conversation as transformers renders it, whole, and with a next user turn after it."""
    from raysft.data.chunks import example_of

    tok = corpus.tokenizer_for(c)
    record = corpus.SHAPES[shape]
    messages, _ = conversation(example_of(record, corpus.settings(kwargs)), tok)
    render = lambda msgs: tok.apply_chat_template(msgs, tools=record.get("tools"), tokenize=False,  # noqa: E731
                                                  **{**c.kwargs, **kwargs})
    return tok, messages, render(messages), render(messages + [{"role": "user", "content": "ok"}])


def test_every_refusal_is_one_the_template_forces(results):
    """A refusal is checked against transformers' own render, not raysft's reading of it: `template_drops_content`
    only where the rendered conversation lacks the turn's reasoning or tool call (or the tools), `no_end_of_turn`
    only where no control token follows the last answer, neither at the end nor before a next user turn."""
    for (path, shape), v in results.items():
        if v.verdict != "refused":
            continue
        reason = v.detail.split(":")[0]
        assert reason in corpus.ALLOWED, (path, shape, v.detail)
        c = corpus.case(path)
        tok, messages, whole, following = _whole(c, shape, v.kwargs)
        find = re.compile("|".join(map(re.escape, control_tokens(tok, c.text))))
        if reason == "template_drops_content":
            what = re.search(r"does not render (.*?) (?:of this|in the)", v.detail)[1]
            question = whole.find(messages[-4]["content"]) if shape == "tools" else -1
            lacks = {"its content": messages[-1]["content"] not in whole,
                     "its reasoning": corpus.REASONING not in whole,
                     "tool call 'get_weather'": "get_weather" not in whole[question: whole.find("18C, sunny")],
                     "the record's tools": "get_weather" not in whole[:question]}
            assert all(lacks[part] for part in what.split(", ")), (path, shape, what)
        elif reason == "thinking_off":  # the prompt ends in a closed think block, whatever the template's variables
            prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **c.kwargs)
            assert "fix: set data.chat_template_kwargs" not in v.detail and prompt.rstrip().endswith(("</think>", "<channel|>")), (path, prompt)
        elif reason == "generation_blocks_differ":  # transformers' own assistant mask leaves a control token out
            from transformers.utils.chat_template_utils import render_jinja_template

            (text,), (spans,) = render_jinja_template([messages], tools=corpus.SHAPES[shape].get("tools"),
                                                      chat_template=c.text, return_assistant_tokens_mask=True,
                                                      **tok.special_tokens_map)
            assert any(find.match(text, b) for _, b in spans), (path, shape, spans)
        else:
            answer = messages[-1]["content"]
            after = whole[whole.rfind(answer) + len(answer):] if answer in whole else ""
            between = following[following.rfind(answer) + len(answer): following.rfind("ok")]
            assert not find.search(after) and not find.search(between), (path, shape, after, between)


def test_accepted_pairs_train_the_answer_and_stop_at_a_control_token(results):
    """Each accepted pair trains the last answer, and its last trained run ends on a control token (the end of the
    turn, or the next turn's header): nothing after it is trained."""
    for (path, shape), v in results.items():
        if v.verdict != "accepted":
            continue
        c = corpus.case(path)
        tok = corpus.tokenizer_for(c)
        answer = corpus.SHAPES[shape]["messages"][-1]["content"]
        last = v.trained[-1] if v.trained else ""
        assert answer in last, (path, shape, v.trained)
        assert any(last.endswith(t) for t in control_tokens(tok, c.text)), (path, shape, v.trained)


GOLDEN = {  # (template, shape): the trained text, written by hand from each template's generation prompt and turn
    ("chujiezheng/chatml.jinja", "single"): ["2 + 2 = 4.<|im_end|>"],  # blank line after its prompt: a pre-fill
    ("vllm/tool_chat_template_llama3.1_json.jinja", "single"): ["2 + 2 = 4.<|eot_id|>"],
    ("other-axolotl-ai-cloud-axolotl/phi_3.jinja", "single"): ["2 + 2 = 4.<|end|>"],
    # Gemma 4: the prompt closes an empty thought channel (thinking off); the turn follows it
    ("vllm/tool_chat_template_gemma4.jinja", "single"): ["2 + 2 = 4.<turn|>"],
    # Command-A renders the next assistant header after every conversation: the turn ends at <|END_OF_TURN_TOKEN|>
    ("other-axolotl-ai-cloud-axolotl/command_a.jinja", "single"): ["2 + 2 = 4.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"],
    # Gemma 3 (SGLang's copy) appends `<start_of_turn>model` after the last turn: not trained
    ("sglang/gemma4_chat_template.jinja", "single"): ["\n2 + 2 = 4.<end_of_turn>"],
    # DeepSeek-V3.1 with thinking off: the prompt ends with `</think>`; with `thinking: true` (the variable the error
    # names) it opens `<think>`: the reasoning, `</think>` and the answer are written after it
    ("vllm/tool_chat_template_deepseekv31.jinja", "single"): ["      2 + 2 = 4.<｜end▁of▁sentence｜>"],
    ("vllm/tool_chat_template_deepseekv31.jinja", "reasoning"): [
        f"\n{corpus.REASONING}\n</think>\n\n2 + 2 = 4.<｜end▁of▁sentence｜>"],
    # GLM-4.5: no token closes a turn: the next header <|user|> is trained
    ("sglang/tool_and_thinking_chat_template_glm4.5.jinja", "single"): ["\n<think></think>\n2 + 2 = 4.<|user|>"],
    # gpt-oss: the final channel, and <|return|> at the end of a conversation
    ("other-EchoCog-gpt-oss-20b/chat_template.jinja", "single"): ["<|channel|>final<|message|>2 + 2 = 4.<|return|>"],
    # Mistral v0.3 folds the system message into the last user turn only while it is last: the history renders
    # otherwise, and the turn after the prompt is the answer and </s>
    ("other-axolotl-ai-cloud-axolotl/mistral_v2v3.jinja", "system"): [" 2 + 2 = 4.</s>"],
    # Qwen3: the earlier turn is history (its empty think block dropped), the last turn's block is trained
    ("other-axolotl-ai-cloud-axolotl/qwen3.jinja", "multi"): ["</think>\n\n'apple' reversed is 'elppa'.<|im_end|>"],
    # the families the corpus lacks, written from their public descriptions (templates.NEW_FAMILIES)
    ("fixture/qwq", "single"): ["\n</think>\n\n2 + 2 = 4.<|im_end|>"],  # QwQ opens <think>: empty reasoning, closed
    ("fixture/qwq", "reasoning"): [f"{corpus.REASONING}\n</think>\n\n2 + 2 = 4.<|im_end|>"],
    ("fixture/minimax_m2", "reasoning"): [f"{corpus.REASONING}\n</think>\n\n2 + 2 = 4.[e~["],
    ("fixture/apriel", "single"): ["2 + 2 = 4.\n<|end|>"],  # after the pre-filled "Here are my reasoning steps:\n"
    ("fixture/kimi_k2", "single"): ["2 + 2 = 4.<|im_end|>"],
    # DeepSeek-R1's distills (TRL's copy): the prompt opens <think>; what the model writes after it is the reasoning
    # (none: an empty line), </think>, a blank line, the answer and eos (the template itself strips the reasoning)
    ("trl/deepseek_r1_distill", "single"): ["\n</think>\n\n2 + 2 = 4.<｜end▁of▁sentence｜>"],
    ("trl/deepseek_r1_distill", "reasoning"): [f"{corpus.REASONING}\n</think>\n\n2 + 2 = 4.<｜end▁of▁sentence｜>"],
    # Nemotron 3 Nano opens <think> too, and renders the reasoning with one newline before the answer
    ("trl/nemotron_3_nano", "reasoning"): [f"{corpus.REASONING}\n</think>\n2 + 2 = 4.<|im_end|>"],
    # EXAONE 4 pre-fills a closed empty think block, and the finished turn renders it too: only the answer follows
    ("other-axolotl-ai-cloud-axolotl/exaone4.jinja", "single"): ["2 + 2 = 4.[|endofturn|]"],
    # ChatML-shaped families: the answer and <|im_end|>, never the newline after it
    ("trl/lfm2", "single"): ["2 + 2 = 4.<|im_end|>"],
    ("other-axolotl-ai-cloud-axolotl/falcon_h1.jinja", "single"): ["2 + 2 = 4.<|im_end|>"],
    ("other-axolotl-ai-cloud-axolotl/nemotron_h.jinja", "single"): ["2 + 2 = 4.<|im_end|>"],
    ("vllm/tool_chat_template_olmo3.jinja", "single"): ["2 + 2 = 4.<|im_end|>"],
    ("fixture/smollm3", "single"): ["2 + 2 = 4.<|im_end|>"],
    ("fixture/phi4", "single"): ["2 + 2 = 4.<|im_end|>"],  # <|im_sep|> after the role, nothing after <|im_end|>
    # Qwen2.5's tool convention: the call turn (no content) and the answer after the tool's result
    ("chujiezheng/qwen2.5-instruct.jinja", "tools"): [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18C and sunny.<|im_end|>"],
    # Zephyr's prompt ends with a blank line the finished turn lacks (one newline): the answer follows the shared one
    ("chujiezheng/zephyr.jinja", "single"): ["2 + 2 = 4.</s>"],
    # Baichuan: nothing closes a turn; the next user turn's <reserved_106> is what the model writes to stop
    ("vllm/template_baichuan.jinja", "single"): ["2 + 2 = 4.<reserved_106>"],
    ("other-axolotl-ai-cloud-axolotl/cohere.jinja", "single"): ["2 + 2 = 4.<|END_OF_TURN_TOKEN|>"],
    ("other-axolotl-ai-cloud-axolotl/llama4.jinja", "single"): ["2 + 2 = 4.<|eot|>"],
    ("other-axolotl-ai-cloud-axolotl/deepseek_v3.jinja", "single"): ["2 + 2 = 4.<｜end▁of▁sentence｜>"],
    ("other-axolotl-ai-cloud-axolotl/mistral_v7_tekken.jinja", "system"): ["2 + 2 = 4.</s>"],
    ("other-axolotl-ai-cloud-axolotl/jamba.jinja", "single"): [" 2 + 2 = 4.<|eom|>"],  # a space after the header
    ("vllm/tool_chat_template_hunyuan_a13b.jinja", "single"): ["2 + 2 = 4.<|eos|>"],
    ("fixture/granite3", "single"): ["2 + 2 = 4.<|end_of_text|>"],
    ("fixture/granite4", "tools"): [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|end_of_text|>',
        "It is 18C and sunny.<|end_of_text|>"],
}


@pytest.mark.parametrize("pair", sorted(GOLDEN), ids=lambda p: f"{p[0]}:{p[1]}")
def test_golden_trained_text(results, pair):
    v = results[pair]
    assert v.verdict == "accepted" and v.trained == GOLDEN[pair], v
