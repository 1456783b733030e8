"""The built-in chat templates: each renders a conversation as (text, is_assistant) segments, and has a Jinja twin
that renders the same text (installed as the run's tokenizer chat template, so a saved model carries the format it
was trained in).

The model families' formats follow their makers' encoders, checked token for token in tests/test_oracles.py:
  llama3   Meta's llama_models ChatFormat (Llama 3, 3.1, 3.2, 3.3)
  mistral  mistral-common's v3 instruct tokenizer ([INST]/[/INST] control tokens: Mistral 7B v0.3, Mixtral 8x22B,
           Codestral...; the system prompt goes before the LAST user message, as mistral-common does)
  mistral-v1  mistral-common's v1 instruct tokenizer ([INST] as plain text: Mistral 7B v0.1, Mixtral 8x7B; the
           system prompt opens the FIRST user message)
  gemma    the Gemma chat template (a system prompt opens the first user turn, as Gemma 3's does)
  phi3     the Phi-3 / Phi-3.5 chat template
  chatml   ChatML (Qwen, and what tunelab adds to a base tokenizer that has no template)
  alpaca   the Stanford Alpaca prompt

Every assistant segment ends with the family's end-of-turn token (<|eot_id|>, </s>, <end_of_turn>, <|end|>,
<|im_end|>, alpaca: EOS), which carries loss; what the format writes after it belongs to the next prompt.
"""

from __future__ import annotations

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")

# The control tokens each format writes: they must be tokens of the tokenizer (else the format would be split into
# text pieces). chatml's are added to a tokenizer that lacks them; the families' vocabularies have theirs.
CONTROL_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "mistral-v1": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "alpaca": (),
}


def chatml(messages, bos: str, eos: str, generation_prompt: bool):
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def alpaca(messages, bos: str, eos: str, generation_prompt: bool):
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    segments = [((system or ALPACA_PREAMBLE) + "\n\n", False)]
    for m in messages:
        if m["role"] == "user":
            segments.append((f"### Instruction:\n{m['content']}\n\n", False))
        elif m["role"] == "assistant":
            segments += [("### Response:\n", False), (m["content"] + eos, True), ("\n\n", False)]
    if generation_prompt:
        segments.append(("### Response:\n", False))
    return segments


def llama3(messages, bos: str, eos: str, generation_prompt: bool):
    # ChatFormat.encode_dialog_prompt: <|begin_of_text|>, then per message a header, the content as is, <|eot_id|>
    segments = [("<|begin_of_text|>", False)]
    for m in messages:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segments += [(header, False), (m["content"] + "<|eot_id|>", True)]
        else:
            segments.append((header + m["content"] + "<|eot_id|>", False))
    if generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


def mistral(messages, bos: str, eos: str, generation_prompt: bool):
    # mistral-common InstructTokenizerV3: BOS, [INST] user[/INST] (the system prompt and two newlines open the last
    # user message), " reply" EOS (the reply is encoded on its own, so SentencePiece gives it a leading space)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    segments = [(bos, False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            prefix = system + "\n\n" if system and i == last_user else ""
            segments.append((f"[INST] {prefix}{m['content']}[/INST]", False))
        elif m["role"] == "assistant":
            segments.append((" " + m["content"] + eos, True))
    return segments  # the generation prompt is the [/INST] already there


def mistral_v1(messages, bos: str, eos: str, generation_prompt: bool):
    # mistral-common InstructTokenizerV1: each message is encoded on its own, so SentencePiece starts each with a
    # space: BOS, " [INST] user [/INST]" (the system prompt and two newlines open the first user message),
    # " reply" EOS
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    first_user = min((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    segments = [(bos, False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            prefix = system + "\n\n" if system and i == first_user else ""
            segments.append((f" [INST] {prefix}{m['content']} [/INST]", False))
        elif m["role"] == "assistant":
            segments.append((" " + m["content"] + eos, True))
    return segments


def gemma(messages, bos: str, eos: str, generation_prompt: bool):
    system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
    segments = [(bos, False)]
    for i, m in enumerate(messages[1:] if system else messages):
        opening = system if i == 0 else ""
        if m["role"] == "assistant":
            segments += [("<start_of_turn>model\n" + opening, False), (m["content"].strip() + "<end_of_turn>", True),
                         ("\n", False)]
        else:
            segments.append((f"<start_of_turn>{m['role']}\n{opening}{m['content'].strip()}<end_of_turn>\n", False))
    if generation_prompt:
        segments.append(("<start_of_turn>model\n", False))
    return segments


def phi3(messages, bos: str, eos: str, generation_prompt: bool):
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|assistant|>\n", False), (m["content"] + "<|end|>", True), ("\n", False)]
        else:
            segments.append((f"<|{m['role']}|>\n{m['content']}<|end|>\n", False))
    segments.append(("<|assistant|>\n" if generation_prompt else eos, False))
    return segments


RENDER = {"chatml": chatml, "alpaca": alpaca, "llama3": llama3, "mistral": mistral, "mistral-v1": mistral_v1,
          "gemma": gemma, "phi3": phi3}

JINJA = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') "
        "| join('\\n\\n') %}"
        "{{ (system or '" + ALPACA_PREAMBLE + "') + '\\n\\n' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') "
        "| join('\\n\\n') %}"
        "{% set ns = namespace(last_user=-1) %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
        "{% endif %}{% endfor %}"
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\\n\\n' if system and loop.index0 == ns.last_user else '') + message['content']"
        " + '[/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "mistral-v1": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') "
        "| join('\\n\\n') %}"
        "{% set ns = namespace(first_user=-1) %}"
        "{% for message in messages %}{% if message['role'] == 'user' and ns.first_user < 0 %}"
        "{% set ns.first_user = loop.index0 %}{% endif %}{% endfor %}"
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ ' [INST] ' + (system + '\\n\\n' if system and loop.index0 == ns.first_user else '') + message['content']"
        " + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    # Gemma's published template (as Gemma 3 handles a system prompt), for string contents
    "gemma": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set first_user_prefix = \"\" -%}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
        "{%- endif -%}"
        "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
        "{{ message['content'] | trim }}"
        "{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
    ),
    # Phi-3.5-mini-instruct's published template
    "phi3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}
