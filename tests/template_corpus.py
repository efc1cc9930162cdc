"""The real chat templates in `../shared/templates/` (each file's source, commit and sha256: its SOURCES.md) as test
fixtures, each hosted on a real tokenizer from `../shared/tokenizers/`, and the sweep of every template over five
record shapes with its verdict: accepted (exact), refused (with the reason), or excluded (transformers itself cannot
render the pair). `python tests/template_corpus.py` writes docs/TEMPLATES.md from the sweep; a test checks that the
page and the sweep agree.

Hosting, recorded here per template: Llama-3 and Llama-4 header templates on Llama-3's tokenizer (128,257 ids),
Phi-3 templates on Phi-3's SentencePiece (32,064 ids), every other family on Qwen2's (151,936 ids). The control
tokens a template writes (`CONTROL` finds the usual spellings; `EXTRA` adds a family's own) are added to the host
as it lacks them, once per test run; they are added as plain added tokens, which raysft reads as control tokens
exactly where the template writes them (`raysft.data.rendering.control_tokens`), so one host serves every template
and each verdict is what a tokenizer of that family would give. `bos_token`/`eos_token` are set per template to the
family's, and `date_string` is pinned for templates that render today's date.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
TEMPLATES = os.path.join(SHARED, "templates")
TOKENIZERS = os.path.join(SHARED, "tokenizers")
DOC = os.path.join(HERE, "..", "docs", "TEMPLATES.md")

CONTROL = re.compile(r"<\|[^|<>\s'\"]+\|>|<｜[^｜]+｜>|<\|[a-z_]+>|<[a-z_]+\|>|\[\|[a-z_]+\|\]"
                     r"|</?(?:think|start_of_turn|end_of_turn|bos|eos|s|sop|SYS)>|\[gMASK\]|\[/?[A-Z_]{3,}\]"
                     r"|<[A-Z_]{3,}>|</?(?:tool_call|tool_response|tools)>|<reserved_\d+>|<extra_id_\d+>|<SPECIAL_\d+>|<_[a-z]+>")
EXTRA = {  # tokens a template writes that CONTROL does not spell out, as the family's tokenizer has them
    "vllm/tool_chat_template_minimax_m1.jinja": ["<beginning_of_sentence>", "<end_of_sentence>"],
}
NOT_CONTROL = {"<SYS>", "<IMPORTANT>"}  # plain text in the templates that write them (Llama-2's <<SYS>> is text)
EOS = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<turn|>", "<｜end▁of▁sentence｜>", "<|return|>",
       "<|END_OF_TURN_TOKEN|>", "<|eot|>", "<|end|>", "<|endoftext|>", "[|endofturn|]", "[e~[", "<|end_of_text|>",
       "</s>"]
BOS = ["<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>", "<|startoftext|>", "<BOS_TOKEN>", "<s>"]
DATE = "26 Jul 2024"

Q1, A1, Q2, A2 = "What is 2 + 2?", "2 + 2 = 4.", "Reverse the word 'apple'.", "'apple' reversed is 'elppa'."
REASONING = "The user asks for 2 + 2. That is 4."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
SHAPES = {  # the record shapes of the sweep (OpenAI's chat format; a tool call id of 9 characters fits Mistral's)
    "single": {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]},
    "system": {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1}]},
    "multi": {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                           {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]},
    "reasoning": {"messages": [{"role": "user", "content": Q1},
                               {"role": "assistant", "content": A1, "reasoning_content": REASONING}]},
    "tools": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."}]},
}
ALLOWED = {  # the only reasons a template may refuse a record: it cannot be trained as written
    "template_drops_content": "the template does not render what the record gives (tool calls, tools, reasoning)",
    "no_end_of_turn": "no token ends a turn and no control token opens the next",
    "thinking_off": "the generation prompt closes an empty think block and no template variable opens it",
    "generation_blocks_differ": "the template's own {% generation %} blocks leave out part of what it renders",
}


FIXTURE = "fixture/"  # the families the corpus lacks, written by hand in templates.py (SHAPES)
TRL = "trl/"  # the templates TRL installs (the models' own and its `_training` copies with generation blocks)
VISION = ("idefics3", "smolvlm", "llava_next")  # content as image and text parts: not text SFT


def trl_folder() -> str:
    import trl

    return os.path.join(os.path.dirname(trl.__file__), "chat_templates")


def template_paths() -> list[str]:
    """Every template of the shared corpus, TRL's installed text templates, then the hand-written fixtures of
    families neither has."""
    import templates

    found = []
    for folder, _, files in os.walk(TEMPLATES):
        found += [os.path.relpath(os.path.join(folder, f), TEMPLATES) for f in files if f.endswith(".jinja")]
    trl = sorted(TRL + f[:-6] for f in os.listdir(trl_folder()) if f.endswith(".jinja") and not f.startswith(VISION))
    return sorted(found) + trl + [FIXTURE + name for name in templates.SHAPES]


@functools.lru_cache(maxsize=None)
def real_tokenizer(name: str):
    """A tokenizer of ../shared/tokenizers (its tokenizer.json gunzipped into a temporary folder), loaded once."""
    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix=f"tok-{name}-")
    for f in os.listdir(os.path.join(TOKENIZERS, name)):
        src = os.path.join(TOKENIZERS, name, f)
        if f.endswith(".gz"):
            with gzip.open(src) as z, open(os.path.join(folder, f[:-3]), "wb") as out:
                out.write(z.read())
        else:
            shutil.copy(src, folder)
    return AutoTokenizer.from_pretrained(folder)


@dataclass
class Case:
    path: str
    text: str
    host: str
    tokens: list
    bos: str | None
    eos: str
    kwargs: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def case(path: str) -> Case:
    fixed: dict = {}
    if path.startswith(FIXTURE):  # its control tokens (and template variables) as the fixture records them
        import templates

        text, specials, _, _, fixed = templates.SHAPES[path[len(FIXTURE):]]
        tokens = sorted(specials)
    else:
        where = os.path.join(trl_folder(), path[len(TRL):] + ".jinja") if path.startswith(TRL) else os.path.join(
            TEMPLATES, path)
        with open(where, encoding="utf-8", newline="") as f:
            text = f.read()
        tokens = sorted((set(CONTROL.findall(text)) | set(EXTRA.get(path, []))) - NOT_CONTROL)
    if "<|eot_id|>" in tokens or "<|start_header_id|>" in tokens:
        host = "llama3"
    elif "<|end|>" in tokens and "<|assistant|>" in tokens and "<|im_start|>" not in tokens:
        host = "phi3"
    else:
        host = "qwen2"
    eos = next((t for t in EOS if t in tokens), "</s>")
    bos = next((t for t in BOS if t in tokens or t in text), "<s>" if "bos_token" in text else None)
    kwargs = {"date_string": DATE} if "strftime_now" in text or "date_string" in text else {}
    return Case(path, text, host, tokens, bos, eos, {**kwargs, **fixed})


@functools.lru_cache(maxsize=None)
def host(name: str):
    """A real tokenizer with the tokens of every template it hosts added, once per run: the families' bos and eos
    as special tokens (as every family has them), the rest as plain added tokens."""
    from tokenizers import AddedToken

    tok = real_tokenizer(name)
    cases = [c for c in map(case, template_paths()) if c.host == name]
    ends = {t for c in cases for t in (c.bos, c.eos) if t}
    others = {t for c in cases for t in c.tokens} - ends
    added = tok.get_added_vocab()  # a token the vocabulary has as a plain piece (Qwen2's "</s>") is added too
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(ends) if t not in added])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in sorted(others) if t not in added])
    return tok


def tokenizer_for(c: Case):
    """The host tokenizer carrying the template, with the family's bos and eos."""
    tok = host(c.host)
    tok.eos_token = c.eos
    tok.bos_token = c.bos
    tok.chat_template = c.text
    return tok


def settings(kwargs: dict):
    from raysft.data.chunks import Settings

    return Settings(max_seq_len=4096, packing=True, loss_on="completion", system_message=None, on_bad_record="error",
                    on_overlong="truncate", hf_split="train", eval_fraction=0.0, chat_template="model",
                    chat_template_kwargs=kwargs)


def renderable(tok, record: dict, kwargs: dict):
    """None, or why transformers itself cannot render this record with this template (the pair is excluded)."""
    from raysft.data.chunks import example_of
    from raysft.data.rendering import conversation

    messages, start = conversation(example_of(record, settings(kwargs)), tok)
    tools = record.get("tools")
    try:
        tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
        for j, m in enumerate(messages):
            if m["role"] == "assistant" and j >= start:
                tok.apply_chat_template(messages[:j], tools=tools, tokenize=False, add_generation_prompt=True,
                                        **kwargs)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return None


@dataclass
class Verdict:
    verdict: str  # accepted | refused | excluded
    detail: str  # the rules applied, the refusal's reason, or why excluded
    kwargs: dict = field(default_factory=dict)  # a template variable the error named, set for the record
    trained: list = field(default_factory=list)  # the trained runs' text, accepted only


def check(c: Case, shape: str) -> Verdict:
    """One (template, shape) pair through raysft's preflight check of a record."""
    from raysft.data.chunks import render
    from raysft.data.preflight import check_example
    from raysft.data.records import RecordError
    from raysft.data.rendering import control_tokens
    from raysft.data.tokenize import IGNORE_INDEX, tokenize_rendered

    tok = tokenizer_for(c)
    record = SHAPES[shape]
    why = renderable(tok, record, c.kwargs)
    if why:
        return Verdict("excluded", why)
    closers = {tok.convert_tokens_to_ids(t) for t in control_tokens(tok, c.text)}
    kwargs = dict(c.kwargs)
    for _ in range(2):  # a second try with the template variable an error names (as a user would set it)
        try:
            _, _, rules = check_example(record, settings(kwargs), tok, closers)
        except RecordError as err:
            named = re.search(r"set data\.chat_template_kwargs: \{(\w+): (\w+)\}", err.message)
            if err.reason in ("reasoning_needs_kwarg", "thinking_off") and named and named[1] not in kwargs:
                kwargs[named[1]] = {"true": True, "false": False}.get(named[2], named[2])
                continue
            return Verdict("refused", f"{err.reason}: {err.message}", {k: v for k, v in kwargs.items()
                                                                       if k not in c.kwargs})
        ids, labels = tokenize_rendered([render(record, settings(kwargs), tok)], tok)[0]
        runs, run = [], []
        for i, lab in zip(ids, labels):
            if lab != IGNORE_INDEX:
                run.append(i)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        return Verdict("accepted", ", ".join(rules), {k: v for k, v in kwargs.items() if k not in c.kwargs},
                       [tok.decode(r) for r in runs])
    raise AssertionError("unreachable")


def sweep() -> dict:
    return {(path, shape): check(case(path), shape) for path in template_paths() for shape in SHAPES}


def summary(results: dict) -> tuple[int, int, int]:
    """(accepted, refused, excluded) pairs."""
    n = Counter(v.verdict for v in results.values())
    return n["accepted"], n["refused"], n["excluded"]


def forced(results: dict) -> int:
    """The refusals for a reason the template forces (ALLOWED): it drops what the record gives, or nothing ends a
    turn."""
    return sum(v.verdict == "refused" and v.detail.split(":")[0] in ALLOWED for v in results.values())


def _cell(v: Verdict) -> str:
    if v.verdict == "accepted":
        kw = "; " + ", ".join(f"{k}={v}" for k, v in v.kwargs.items()) if v.kwargs else ""
        return f"✓ {v.detail}{kw}"
    if v.verdict == "refused":
        return "✗ " + v.detail.split(":")[0]
    return "— excluded"


def table(results: dict) -> str:
    accepted, refused, excluded = summary(results)
    lines = [
        "# Chat templates: the sweep's verdicts",
        "",
        "Generated by `python tests/template_corpus.py` from the sweep that `tests/test_template_sweep.py` runs (the",
        "test fails when this page and the sweep disagree). Every real template in `../shared/templates/` (sources: its",
        "SOURCES.md), on a real tokenizer (`../shared/tokenizers/`: Llama-3 for its header templates, Phi-3 for Phi-3's,",
        "Qwen2 for the rest, with the family's control tokens added), against five records: a single turn, a system",
        "message, two trained turns, reasoning (`reasoning_content`), and a tool call with its result. Then TRL's",
        "installed text templates (`trl/`), and last the families neither has (QwQ, Kimi-K2, MiniMax-M2, Apriel,",
        "Granite 4, SmolLM3, Phi-4, Granite 3, Mistral v0.3 with tools), written by hand from their public descriptions",
        "as fixtures (`fixture/`, in `tests/templates.py`).",
        "",
        "✓ accepted: the prompt's ids are exactly `apply_chat_template(..., add_generation_prompt=True)`, the trained",
        "tokens are the turn and the token that ends it (the rules that read the template are named, as",
        "[DATA.md's chat template section](DATA.md#chat-templates) explains them); a `name=value` is the template",
        "variable an error named and the record trains with. ✗ refused, with the reason: only where the template cannot",
        "train the record as written (it drops what the record gives, or nothing ends a turn). — excluded: transformers",
        "itself cannot render the pair (the template raises: roles it does not take, tool calls it does not know).",
        "",
        f"**{accepted} of {accepted + refused} renderable pairs accepted "
        f"({100 * accepted / max(1, accepted + refused):.1f}%)**, {refused} refused, {excluded} excluded. "
        f"Of the refusals, {forced(results)} are a",
        "template that cannot train the record as written (each checked against transformers' own render by the sweep's",
        f"test): of the pairs a template can train, {accepted} of {accepted + refused - forced(results)} are accepted.",
        "",
        "| template | host | " + " | ".join(SHAPES) + " |",
        "|---|---|" + "---|" * len(SHAPES),
    ]
    for path in template_paths():
        c = case(path)
        cells = [_cell(results[path, shape]) for shape in SHAPES]
        lines.append(f"| `{path}` | {c.host} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(HERE, ".."))
    results = sweep()
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(table(results))
    print("wrote", DOC, summary(results))
