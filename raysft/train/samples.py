"""`train.eval_prompts`: what the model says, at each eval, to a few prompts (greedy, the run's chat template).

Every rank runs the same generations (under ZeRO-3 each forward pass gathers the parameters from all ranks:
`synced_gpus`), so rank 0 can log the answers (`StepLog.samples`). Greedy decoding draws no random numbers: an
eval with samples leaves the run's RNG, and so its exact resume, as it was.
"""

from __future__ import annotations

from typing import Optional


def answer_prompts(model, tokenizer, prompts: list[str], system_message, max_new_tokens: int, synced: bool,
                   device, template_kwargs: Optional[dict] = None) -> list[str]:
    """The model's greedy answer to each prompt, up to `max_new_tokens`, stopping at the template's end of turn.
    `model`: the Hugging Face (or PEFT) model, in eval mode; `template_kwargs`: `data.chat_template_kwargs`."""
    import torch
    from transformers import GenerationConfig

    from raysft.data.template import render_prompt, stop_ids
    from raysft.data.tokenize import tokenize_rendered

    eos = stop_ids(tokenizer, template_kwargs=template_kwargs)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            rendered = render_prompt([{"role": "user", "content": prompt}], tokenizer, system_message,
                                     template_kwargs=template_kwargs)
            ids = torch.tensor([tokenize_rendered([rendered], tokenizer)[0][0]], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 synced_gpus=synced)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
