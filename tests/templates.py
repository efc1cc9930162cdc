"""Chat templates of other model families, written here as fixtures (the real ones are not downloaded), and
tokenizers that carry them: byte-level (ByT5's), a byte-level BPE and a SentencePiece-style (Metaspace) BPE, both
trained here (Rust `tokenizers`).

Each template keeps the shape that matters of the family it is named after: its headers, its end-of-turn token,
where the system message goes, what the generation prompt is.
"""

from __future__ import annotations

LLAMA3 = (  # header tokens, <|eot_id|>, a default system block, tools in the system block, tool calls as JSON
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system }}"
    "{%- if tools %}{{- '\\n\\nYou can call these functions:' }}"
    "{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.get('tool_calls') %}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' + call['function']['arguments'] | tojson"
    " + '}' }}{%- endfor %}"
    "{%- else %}{{- message['content'] | trim }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GEMMA = (  # `model` for assistant, the system message folded into the first user turn, <end_of_turn>
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

MISTRAL = (  # [INST] ... [/INST], no assistant header, </s> ends the turn, system folded into the first [INST]
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set prefix = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('Only user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)

QWEN = (  # ChatML with a default system message, Qwen2.5's tool convention, reasoning as Qwen3 writes it
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools %}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.get('reasoning_content') %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message['content'] }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": '"
    " + call['function']['arguments'] | tojson + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Broken on purpose, one way each: the preflight must refuse them.
QWEN3_HISTORY = (  # drops the reasoning of assistant turns before the last user turn (Qwen3's rule): not prefix-stable
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and m.get('reasoning_content') and loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NO_END_TOKEN = (  # ### headers, turns closed by blank lines: no token to stop at
    "{%- for m in messages %}{{- '### ' + m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### assistant:\\n' }}{%- endif %}"
)
DROPS_ANSWERS = (  # renders assistant turns without their content
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}{%- if m['role'] != 'assistant' %}"
    "{{- m['content'] }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ONLY_ANSWERS = (  # renders only assistant turns, and no generation prompt: every token trained
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- m['content'] + '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
)
BLOCKS_SHORT = (  # {% generation %} blocks that leave out the end-of-turn token the turn is closed with
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' %}{%- generation %}{{- m['content'] }}{%- endgeneration %}"
    "{%- else %}{{- m['content'] }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NO_TOOLS = (  # a ChatML template that ignores tool calls
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name -> (template, special tokens, bos, eos, the end-of-turn token, how an assistant turn's trained text ends)
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
    "qwen": (QWEN, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
}
BROKEN_SPECIALS = ["<|im_start|>", "<|im_end|>"]

CORPUS = ["What is 2 + 2? 2 + 2 = 4.", "Reverse the word 'apple'. 'apple' reversed is 'elppa'.",
          "You are a helpful assistant. Answer briefly.", "system user assistant model tool [INST] [/INST]",
          "Weather in Paris? It is 18C and sunny. get_weather city name arguments parameters",
          "Let me think about it step by step. The answer follows."] * 20


def byte_tokenizer(template: str, specials: list[str], bos=None, eos=None):
    """ByT5's byte-level tokenizer with the family's special tokens and template."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    extra = [t for t in specials if t not in (bos, eos)]
    tok.add_special_tokens({"additional_special_tokens": extra,
                            **({"bos_token": bos} if bos else {}), **({"eos_token": eos} if eos else {})})
    tok.chat_template = template
    return tok


def bpe_tokenizer(template: str, specials: list[str], bos=None, eos=None):
    """A byte-level BPE trained on a small corpus, with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    every = list(dict.fromkeys(specials + [t for t in (bos, eos) if t]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=every,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                  additional_special_tokens=[t for t in every if t not in (bos, eos)])
    tok.chat_template = template
    return tok


def sentencepiece_tokenizer(template: str, specials: list[str], bos=None, eos=None, scheme="first"):
    """A BPE with SentencePiece's Metaspace pre-tokenizer (a "▁" marks word starts and the text's start), as
    Llama-2, Mistral and Gemma tokenizers have; scheme "always" (legacy ones) marks every text after a special
    token too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    every = list(dict.fromkeys(["<unk>"] + specials + [t for t in (bos, eos) if t]))
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    bpe.train_from_iterator(CORPUS + ["\n'\"{}[]:,_|<>/"], trainers.BpeTrainer(vocab_size=600, special_tokens=every))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                  additional_special_tokens=[t for t in every if t not in (bos, eos, "<unk>")])
    tok.chat_template = template
    return tok


def legacy_sentencepiece_tokenizer(template: str, specials: list[str], bos=None, eos=None):
    return sentencepiece_tokenizer(template, specials, bos, eos, scheme="always")


KINDS = {"byte": byte_tokenizer, "bpe": bpe_tokenizer, "sentencepiece": sentencepiece_tokenizer,
         "sentencepiece-legacy": legacy_sentencepiece_tokenizer}


def family_tokenizer(family: str, kind: str):
    template, specials, bos, eos, _ = FAMILIES[family]
    return KINDS[kind](template, specials, bos, eos)

# Families whose templates no installed package ships, written in their real shape (item 7 of issue 23).
PHI4 = (  # ChatML with <|im_sep|> after the role, no tools
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)
MISTRAL_TOOLS = (  # Mistral v0.3: tools and the system message with the last user turn, [TOOL_CALLS], no header
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set users = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if tools and m == users[-1] %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if system is defined and m == users[-1] %}{{- '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}{{- '[TOOL_CALLS] [' }}"
    "{%- for call in m['tool_calls'] %}{{- '{\"name\": \"' + call['function']['name'] + '\", \"arguments\": '"
    " + call['function']['arguments'] | tojson + '}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
    "{%- elif m['role'] == 'tool' %}{{- '[TOOL_RESULTS] {\"content\": ' + m['content'] | tojson + '}[/TOOL_RESULTS]' }}"
    "{%- endif %}{%- endfor %}"
)
SMOLLM3 = (  # ChatML, a metadata system block naming the reasoning mode; /no_think pre-fills an empty think block
    "{%- set mode = 'no_think' if enable_thinking is defined and not enable_thinking else 'think' %}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\nReasoning Mode: /' + mode"
    " + '\\n\\n## Custom Instructions\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{{- 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.' }}"
    "{%- set loop_messages = messages %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- for m in loop_messages %}"
    "{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if mode == 'no_think' %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}{{- m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if mode == 'no_think' %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}{%- endif %}"
)
GRANITE = (  # Granite 3.x: role markers, <|end_of_text|> closes every turn, tools in a role of their own
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}"
    "{%- set system = 'Knowledge Cutoff Date: April 2024.\\nYou are Granite, developed by IBM.' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system + '<|end_of_text|>\\n' }}"
    "{%- if tools %}{{- '<|start_of_role|>tools<|end_of_role|>' + tools | tojson + '<|end_of_text|>\\n' }}{%- endif %}"
    "{%- for m in loop_messages %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}"
    "{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' + m['tool_calls'] | map(attribute='function')"
    " | list | tojson + '<|end_of_text|>\\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '<|start_of_role|>tool_response<|end_of_role|>' + m['content'] + '<|end_of_text|>\\n' }}"
    "{%- else %}{{- '<|start_of_role|>' + m['role'] + '<|end_of_role|>' + m['content'] + '<|end_of_text|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
SHAPES = {  # name: (template, specials, bos, eos, data.chat_template_kwargs)
    "phi4": (PHI4, ["<|im_start|>", "<|im_sep|>", "<|im_end|>"], None, "<|im_end|>", {}),
    "mistral_v0_3_tools": (MISTRAL_TOOLS, ["<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                                           "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                           "<s>", "</s>", {}),
    "smollm3": (SMOLLM3, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", {}),
    "smollm3_no_think": (SMOLLM3, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>",
                         {"enable_thinking": False}),
    "granite3": (GRANITE, ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"], None,
                 "<|end_of_text|>", {}),
}

# Families the shared corpus lacks (issue 38, item 4), each written here by hand from its public description (the
# model card or the prompt-format guide it names); the shape that matters kept, nothing copied.
QWQ = (  # Qwen/QwQ-32B: ChatML; the generation prompt opens `<think>\n`; a finished turn keeps only what follows
    # </think> (its reasoning is never in the history); Qwen2.5's tools and <tool_call> convention
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' or (m['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'assistant' %}{%- set content = (m['content'] or '').split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- for call in m.get('tool_calls') or [] %}{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": '"
    " + call['function']['arguments'] | tojson + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
KIMI_K2 = (  # moonshotai/Kimi-K2-Instruct: <|im_user|>/<|im_assistant|>/<|im_system|> headers with the role name and
    # <|im_middle|>, <|im_end|> closing every message, a default system message, tools declared in a system block,
    # calls as functions.NAME:INDEX in a tool-calls section
    "{%- if tools %}{{- '<|im_system|>tool_declare<|im_middle|>' + tools | tojson + '<|im_end|>' }}{%- endif %}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- '<|im_system|>system<|im_middle|>' }}"
    "{%- elif m['role'] == 'user' %}{{- '<|im_user|>user<|im_middle|>' }}"
    "{%- elif m['role'] == 'assistant' %}{{- '<|im_assistant|>assistant<|im_middle|>' }}"
    "{%- else %}{{- '<|im_system|>tool<|im_middle|>' }}{%- endif %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}{{- m['content'] or '' }}"
    "{{- '<|tool_calls_section_begin|>' }}{%- for call in m['tool_calls'] %}"
    "{{- '<|tool_call_begin|>functions.' + call['function']['name'] + ':' + loop.index0 | string"
    " + '<|tool_call_argument_begin|>' + call['function']['arguments'] | tojson + '<|tool_call_end|>' }}"
    "{%- endfor %}{{- '<|tool_calls_section_end|>' }}"
    "{%- elif m['role'] == 'tool' %}{{- '## Return of ' + m['tool_call_id'] + '\\n' + m['content'] }}"
    "{%- else %}{{- m['content'] }}{%- endif %}{{- '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_assistant|>assistant<|im_middle|>' }}{%- endif %}"
)
MINIMAX_M2 = (  # MiniMaxAI/MiniMax-M2: ]~!b[ opens the conversation, ]~b]ROLE opens a message, [e~[ closes it; the
    # generation prompt opens `<think>\n`; reasoning after the last user message kept (interleaved thinking); tool
    # calls as <minimax:tool_call><invoke name=...><parameter name=...>
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- ']~!b[]~b]system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}"
    "{{- '\\n</tools>' }}{%- endif %}{{- '[e~[\\n' }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- ']~b]user\\n' + m['content'] + '[e~[\\n' }}"
    "{%- elif m['role'] == 'assistant' %}{{- ']~b]ai\\n' }}"
    "{%- if m.get('reasoning_content') and loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif %}{{- m['content'] or '' }}"
    "{%- if m.get('tool_calls') %}{{- '\\n<minimax:tool_call>' }}{%- for call in m['tool_calls'] %}"
    "{{- '\\n<invoke name=\"' + call['function']['name'] + '\">' }}"
    "{%- for k, v in call['function']['arguments'].items() %}"
    "{{- '\\n<parameter name=\"' + k + '\">' + v | string + '</parameter>' }}{%- endfor %}{{- '\\n</invoke>' }}"
    "{%- endfor %}{{- '\\n</minimax:tool_call>' }}{%- endif %}{{- '[e~[\\n' }}"
    "{%- elif m['role'] == 'tool' %}{{- ']~b]tool\\n<response>' + m['content'] + '</response>[e~[\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- ']~b]ai\\n<think>\\n' }}{%- endif %}"
)
APRIEL = (  # ServiceNow-AI/Apriel-1.5-15b-Thinker: <|system|>/<|user|>/<|assistant|> headers on their own line,
    # <|end|> after each message; a default system message asking for [BEGIN FINAL RESPONSE] ... [END FINAL
    # RESPONSE]; the generation prompt pre-fills the sentence "Here are my reasoning steps:\n"; no tools
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = 'You are a thoughtful and systematic AI "
    "assistant. Present your reasoning step by step, then the final solution as [BEGIN FINAL RESPONSE] ... "
    "[END FINAL RESPONSE].' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|system|>\\n' + system + '\\n<|end|>\\n' }}"
    "{%- for m in loop_messages %}{{- '<|' + m['role'] + '|>\\n' + (m['content'] or '') + '\\n<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\nHere are my reasoning steps:\\n' }}{%- endif %}"
)
GRANITE4 = (  # ibm-granite/granite-4.0 (its prompt engineering guide): <|start_of_role|>ROLE<|end_of_role|>, each
    # message closed by <|end_of_text|>; tools listed in the system message within <tools>; calls as <tool_call>
    # JSON; tool results as a user message within <tool_response>
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- if tools %}{%- set ns = namespace(text=(system + '\\n\\n' if system else '') + 'You are a helpful "
    "assistant with access to the following tools. You may call one or more tools to assist with the user "
    "query.\\n\\n<tools>') %}"
    "{%- for t in tools %}{%- set ns.text = ns.text + '\\n' + t | tojson %}{%- endfor %}"
    "{%- set system = ns.text + '\\n</tools>' %}{%- endif %}"
    "{%- if system %}{{- '<|start_of_role|>system<|end_of_role|>' + system + '<|end_of_text|>\\n' }}{%- endif %}"
    "{%- for m in loop_messages %}"
    "{%- if m['role'] == 'tool' %}"
    "{{- '<|start_of_role|>user<|end_of_role|><tool_response>\\n' + m['content'] + '\\n</tool_response><|end_of_text|>\\n' }}"
    "{%- else %}{{- '<|start_of_role|>' + m['role'] + '<|end_of_role|>' + (m['content'] or '') }}"
    "{%- for call in m.get('tool_calls') or [] %}{{- '<tool_call>\\n{\"name\": \"' + call['function']['name']"
    " + '\", \"arguments\": ' + call['function']['arguments'] | tojson + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|end_of_text|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
NEW_FAMILIES = {  # name: (template, special tokens, bos, eos, kwargs, where the description is)
    "qwq": (QWQ, ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"], None,
            "<|im_end|>", {}, "Qwen/QwQ-32B model card and tokenizer_config.json"),
    "kimi_k2": (KIMI_K2, ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
                          "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                          "<|tool_call_argument_begin|>", "<|tool_call_end|>"], None, "<|im_end|>", {},
                "moonshotai/Kimi-K2-Instruct docs/tool_call_guidance.md"),
    "minimax_m2": (MINIMAX_M2, ["]~!b[", "]~b]", "[e~[", "<think>", "</think>"], None, "[e~[", {},
                   "MiniMax-AI/MiniMax-M2 docs/tool_calling_guide.md; llama.cpp's MiniMax-M2 format"),
    "apriel": (APRIEL, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>", {},
               "ServiceNow-AI/Apriel-1.5-15b-Thinker model card"),
    "granite4": (GRANITE4, ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"], None, "<|end_of_text|>", {},
                 "ibm-granite Granite 4.0 prompt engineering guide"),
}
SHAPES.update({name: case[:5] for name, case in NEW_FAMILIES.items()})
